"""The cluster as every replica's status pages show it: ``ossensor-replicas`` and more.

Each replica writes its own record (``<replica>`` -> address, start time, counters, Antigena
report totals) every :data:`PUBLISH_SECONDS` and follows the bucket into a bounded mirror, so
``/status.json`` on any replica lists every replica with its counters and the totals add up over
them. On each status request it also asks JetStream for the chunk stream's depth and reads the
store workers' ``worker.<name>`` keys of ``ossensor-store`` (written by the store workers:
shown when present, never depended on, each value bounded and checked to be a JSON object).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from .. import __version__
from . import STREAM, names
from .watch import BucketWatch

log = logging.getLogger("ossensor_vsensor.cluster")

BUCKET = "ossensor-replicas"
STORE_BUCKET = "ossensor-store"
PUBLISH_SECONDS = 5.0
MAX_REPLICAS = 1024
MAX_RECORD_BYTES = 64 << 10
MAX_WORKERS = 256
STATUS_TIMEOUT = 2.0
_KEY = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_=.-]{0,127}")


def replica_key(name: str) -> str:
    """``name`` as a key: itself when it is a valid key (a host or pod name), else a token."""
    return name if _KEY.fullmatch(name) and not name.endswith(".") else names.token(name)


def _object(value: bytes, limit: int) -> dict[str, Any]:
    """A bounded JSON object from the bucket (ValueError otherwise)."""
    if len(value) > limit:
        raise ValueError(f"{len(value)} bytes, over {limit}")
    from ..registration import json_object  # the same JSON rules as a sensor's body

    return json_object(value)


def parse_replica(key: str, value: bytes) -> dict[str, Any]:
    """A replica's record: a JSON object naming the replica of its key, with numeric
    counters; ValueError otherwise."""
    record = _object(value, MAX_RECORD_BYTES)
    name = record.get("name")
    if not isinstance(name, str) or replica_key(name) != key:
        raise ValueError("the record's name is not the replica of its key")
    counters = record.get("counters", {})
    if not isinstance(counters, dict) or len(counters) > 256 or not all(
            isinstance(k, str) and len(k) <= 128 and isinstance(v, int)
            and not isinstance(v, bool) and 0 <= v < 1 << 63 for k, v in counters.items()):
        raise ValueError("counters are not a small object of counts")
    for field in ("updated", "started"):
        stamp = record.get(field)
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) \
                or not 0 <= stamp < 1 << 36:
            raise ValueError(f"{field} is not a time")
    address = record.get("address", "")
    if not isinstance(address, str) or len(address) > 300:
        raise ValueError("address is not a short text")
    return {"name": name, "address": address, "started": record["started"],
            "updated": record["updated"], "counters": counters,
            "version": str(record.get("version", ""))[:64]}


class ReplicaStatus:
    """Publishes this replica's record and keeps the others' (``counters()``: this replica's
    counters now, flat name -> count)."""

    def __init__(self, cluster: Any, address: str, now: Callable[[], float],
                 counters: Callable[[], dict[str, int]]) -> None:
        self.cluster = cluster
        self.kv = cluster.kv(BUCKET)
        self.address = address
        self.now = now
        self.counters = counters
        self.started = now()
        self.replicas: dict[str, dict[str, Any]] = {}
        self.watch = BucketWatch(self.kv, BUCKET, self._on_entry, MAX_RECORD_BYTES,
                                 cluster.js)
        self._task: asyncio.Task[None] | None = None

    def _on_entry(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            self.replicas.pop(key, None)
            return
        record = parse_replica(key, value)
        if key not in self.replicas and len(self.replicas) >= MAX_REPLICAS:
            raise ValueError(f"{MAX_REPLICAS} replicas known already")
        self.replicas[key] = record

    async def start(self) -> None:
        self.watch.start()
        await self.publish()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.watch.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_SECONDS)
            await self.publish()

    async def publish(self) -> None:
        record = {"name": self.cluster.name, "address": self.address, "version": __version__,
                  "started": self.started, "updated": self.now(), "counters": self.counters()}
        try:
            async with asyncio.timeout(STATUS_TIMEOUT):
                await self.kv.put(replica_key(self.cluster.name), json.dumps(record).encode())
        except Exception as exc:  # the status lags; nothing else depends on it
            log.warning("NATS: cannot write this replica's record: %s",
                        str(exc)[:200] or type(exc).__name__)

    async def status(self) -> dict[str, Any]:
        """The cluster part of ``/status.json``: replicas, their totals, the stream, the store
        workers (what could be read within :data:`STATUS_TIMEOUT`)."""
        replicas = sorted(self.replicas.values(), key=lambda r: r["name"])
        totals: dict[str, int] = {}
        for record in replicas:
            for name, value in record["counters"].items():
                totals[name] = totals.get(name, 0) + value
        answer: dict[str, Any] = {"replica": self.cluster.name, "replicas": replicas,
                                  "totals": totals, "stream": None, "store_workers": []}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STATUS_TIMEOUT):
                info = await self.cluster.js.stream_info(STREAM)
                answer["stream"] = {"messages": int(info.state.messages),
                                    "bytes": int(info.state.bytes),
                                    "consumers": int(info.state.consumer_count or 0)}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STATUS_TIMEOUT):
                answer["store_workers"] = await self._workers()
        return answer

    async def _workers(self) -> list[dict[str, Any]]:
        store = self.cluster.kv(STORE_BUCKET)
        workers = []
        for key in (await store.keys())[:4 * MAX_WORKERS]:
            if not key.startswith("worker.") or len(workers) >= MAX_WORKERS:
                continue
            try:
                entry = await store.get(key)
                workers.append({"worker": key[7:135], **_object(bytes(entry.value or b""),
                                                                MAX_RECORD_BYTES)})
            except Exception as exc:  # hostile, or gone meanwhile: shown as skipped
                workers.append({"worker": key[7:135], "error": str(exc)[:200]})
        return workers
