"""What an operator sees: ``/status`` (HTML), ``/status.json`` and ``/metrics``.

Counters and names only, never keys or packet contents; with an admin token configured each
page needs ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import html
import time

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
                 collectors: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.collectors = collectors

    async def status_json(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        return web.json_response({
            "vsensor": __version__, "server_time": self.settings.now(),
            "sensors": [s.as_json() for s in self.registry.sorted_by_name()],
            "antigena": request.app[antigena.ANTIGENA].status(),
        }, headers=PAGE_HEADERS)

    async def status_html(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        rows = []
        for s in self.registry.sorted_by_name():
            cells = [s.name, str(s.version or ""), ", ".join(s.addresses), _when(s.registered),
                     _when(s.last_seen), str(s.packets), str(s.bytes), str(s.chunks),
                     str(s.kernel_drops),
                     "; ".join(f"{i['claim']}: {i['reason']}" for i in s.ignored_claims)
                     + (f" (and {s.ignored_claims_count - len(s.ignored_claims)} more)"
                        if s.ignored_claims_count > len(s.ignored_claims) else "")]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in _COLUMNS)
        page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>ossensor vSensor"
                "</title></head><body><h1>ossensor vSensor</h1>"
                f"<table border=\"1\"><tr>{head}</tr>{''.join(rows)}</table>"
                f"{antigena.status_rows(request.app[antigena.ANTIGENA])}</body></html>")
        return web.Response(text=page, content_type="text/html", headers=PAGE_HEADERS)

    async def metrics(self, request: web.Request) -> web.Response:
        check_admin_token(self.settings, request)
        return web.Response(body=exposition(self.collectors),
                            content_type="text/plain", charset="utf-8",
                            headers=PAGE_HEADERS)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else ""
