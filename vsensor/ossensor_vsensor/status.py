"""What an operator sees: ``/status`` (HTML), ``/status.json`` and ``/metrics``.

Counters and names only, never keys or packet contents; with an admin token configured each
page needs ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from . import __version__, antigena
from .auth import check_admin_token
from .metrics import exposition
from .registry import SensorRegistry
from .settings import VSensorSettings

#: Every page: no script, style, frame or form from anywhere (the page needs none), and no
#: content-type guessing by the browser.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; "
                                           "base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff"}

_COLUMNS = ("sensor", "protocol", "addresses", "registered", "last seen", "packets", "bytes",
            "chunks", "kernel drops", "ignored claims")


class StatusPages:
    """The operator's read-only pages."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry,
                 collectors: CollectorRegistry,
                 cluster: Callable[[], Awaitable[dict[str, Any] | None]] | None = None) -> None:
        """``cluster``: cluster mode's part of the pages (replicas, stream, store workers),
        None in single mode."""
        self.settings = settings
        self.registry = registry
        self.collectors = collectors
        self.cluster = cluster

    async def _cluster(self) -> dict[str, Any] | None:
        return await self.cluster() if self.cluster is not None else None

    async def status_json(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        cluster = await self._cluster()
        return web.json_response({
            "vsensor": __version__, "server_time": self.settings.now(),
            "sensors": [s.as_json() for s in self.registry.sorted_by_name()],
            "antigena": request.app[antigena.ANTIGENA].status(),
            **({"cluster": cluster} if cluster is not None else {}),
        }, headers=PAGE_HEADERS)

    async def status_html(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        cluster = await self._cluster()
        rows = []
        for s in self.registry.sorted_by_name():
            cells = [s.name, str(s.version or ""), ", ".join(s.addresses), _when(s.registered),
                     _when(s.last_seen), str(s.packets), str(s.bytes), str(s.chunks),
                     str(s.kernel_drops),
                     "; ".join(f"{i['claim']}: {i['reason']}" for i in s.ignored_claims)
                     + (f" (and {s.ignored_claims_count - len(s.ignored_claims)} more)"
                        if s.ignored_claims_count > len(s.ignored_claims) else "")]
            if cluster is not None:
                cells.append(s.replica)
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in
                       (*_COLUMNS, *(("replica",) if cluster is not None else ())))
        page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>ossensor vSensor"
                "</title></head><body><h1>ossensor vSensor</h1>"
                f"<table border=\"1\"><tr>{head}</tr>{''.join(rows)}</table>"
                f"{_cluster_rows(cluster) if cluster is not None else ''}"
                f"{antigena.status_rows(request.app[antigena.ANTIGENA])}</body></html>")
        return web.Response(text=page, content_type="text/html", headers=PAGE_HEADERS)

    async def metrics(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        return web.Response(body=exposition(self.collectors),
                            content_type="text/plain", charset="utf-8",
                            headers=PAGE_HEADERS)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else ""


def _cluster_rows(cluster: dict[str, Any]) -> str:
    """HTML for cluster mode: each replica with its counters, the stream, the store workers."""
    def table(head: tuple[str, ...], rows: list[list[str]]) -> str:
        cells = "".join(f"<th>{h}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in rows)
        return f"<table border=\"1\"><tr>{cells}</tr>{body}</table>"

    replicas = [[r["name"], r["address"], _when(r["updated"]),
                 ", ".join(f"{k} {v}" for k, v in sorted(r["counters"].items()))]
                for r in cluster["replicas"]]
    stream = cluster.get("stream") or {}
    workers = [[str(w.get("worker", "")), ", ".join(f"{k} {str(v)[:64]}" for k, v in
                                                    sorted(w.items()) if k != "worker")[:500]]
               for w in cluster.get("store_workers", [])]
    return (f"<h2>Replicas (this one: {html.escape(cluster['replica'])})</h2>"
            + table(("replica", "address", "updated", "counters"), replicas)
            + f"<p>Chunk stream: {html.escape(str(stream.get('messages', '?')))} messages, "
            f"{html.escape(str(stream.get('bytes', '?')))} bytes</p>"
            + "<h2>Store workers</h2>" + table(("worker", "state"), workers))
