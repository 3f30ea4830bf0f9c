"""The vSensor's HTTP application (aiohttp): the server side of ``docs/protocol.md``.

Usage (the CLI does this over TLS)::

    settings = VSensorSettings(data_dir=Path("/var/lib/vsensor"), keys=["..."])
    app = create_app(settings)  # run with web.AppRunner + web.TCPSite(ssl_context=...)

Every sensor request is verified with :func:`ossensor_core.protocol.verify` before its body is
looked at; a failure answers 401 with a generic reason, logs the precise one (never a key) and
stores nothing. The status pages (``/status``, ``/status.json``, ``/metrics``) show counters and
names only, never keys or packet contents, and need ``Authorization: Bearer <admin token>`` when
an admin token is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import html
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ossensor_core.chunk import ChunkCodec
from ossensor_core.protocols import Chunk
from ossensor_core.protocol import (DEFAULT_SKEW_SECONDS, H_VERSION, PATH_CHUNKS,
                                    PATH_HEARTBEAT, PATH_REGISTER, PROTOCOL_VERSIONS, AuthError,
                                    NonceCache, Verified, negotiate, verify)

from . import __version__
from .filters import FilterResult, build_filter, parse_address, peer_networks
from .store import SensorStore, StoreError, enforce_retention

log = logging.getLogger("ossensor_vsensor")

H_CHUNK_SEQUENCE = "X-Ossensor-Chunk-Sequence"
#: ``X-Ossensor-Test: 1`` on a chunk: verify and decode it, answer, store nothing.
H_TEST = "X-Ossensor-Test"
CLIENT_MAX_SIZE = 64 << 20  # larger bodies get 413 before they are read
RETRY_AFTER_SECONDS = 5
FILTER_CACHE_SIZE = 4096  # compiled filters kept (one per distinct sensor view)


@dataclass(frozen=True)
class VSensorSettings:
    """Everything the application needs; parsed once (by the CLI or a test)."""

    data_dir: Path
    keys: Sequence[str]
    admin_token: str | None = None
    skew_seconds: float = float(DEFAULT_SKEW_SECONDS)
    rotate_bytes: int = 100 << 20
    rotate_seconds: float = 300.0
    heartbeat_seconds: float = 10.0
    #: Ports sensors connect to (behind NAT or a load balancer these differ from the port this
    #: process listens on, which is excluded as well).
    vsensor_ports: Sequence[int] = (443,)
    #: Added to time.time(): lets tests shift the vSensor's clock.
    clock_offset: float = 0.0
    client_max_size: int = CLIENT_MAX_SIZE
    #: Delete completed files older than this (None: keep them).
    retain_seconds: float | None = None
    #: Keep the completed files of all sensors together under this size, oldest deleted first
    #: (None: no limit).
    retain_bytes: int | None = None
    #: How often retention runs (it also runs after every completed file).
    retention_interval: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "vsensor_ports", tuple(int(p) for p in self.vsensor_ports))
        if not self.keys or not all(self.keys):
            raise ValueError("VSensorSettings needs at least one non-empty HMAC key")
        for name in ("retain_seconds", "retain_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"VSensorSettings.{name} must be positive, not {value}")
        if self.retention_interval <= 0:
            raise ValueError("VSensorSettings.retention_interval must be positive")

    def __repr__(self) -> str:  # never show keys or the admin token
        return (f"VSensorSettings(data_dir={str(self.data_dir)!r}, keys=<{len(self.keys)}>, "
                f"admin_token={'<set>' if self.admin_token else None}, "
                f"skew_seconds={self.skew_seconds}, rotate_bytes={self.rotate_bytes}, "
                f"rotate_seconds={self.rotate_seconds}, vsensor_ports={self.vsensor_ports}, "
                f"retain_seconds={self.retain_seconds}, retain_bytes={self.retain_bytes})")


@dataclass
class SensorState:
    """What the vSensor knows about one sensor (shown on the status pages)."""

    name: str
    version: int | None = None
    software: str = ""
    addresses: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    registered: float | None = None
    last_seen: float | None = None
    packets: int = 0
    bytes: int = 0
    chunks: int = 0
    duplicates: int = 0
    #: From the last heartbeat: interface -> {"packets": n, "drops": n} (kernel counters).
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "software": self.software,
            "addresses": self.addresses, "interfaces": self.interfaces,
            "registered": self.registered, "last_seen": self.last_seen,
            "packets": self.packets, "bytes": self.bytes, "chunks": self.chunks,
            "duplicates": self.duplicates,
            "kernel_packets": sum(v.get("packets", 0) for v in self.kernel.values()),
            "kernel_drops": sum(v.get("drops", 0) for v in self.kernel.values()),
            "kernel": self.kernel,
        }


def auth_reason(error: AuthError) -> str:
    """The reason code of an AuthError: the 401's ``error`` and a metric label.

    Codes tell the sensor's operator what to fix (clock, key, a proxy that rewrites bodies)
    without helping anyone guess a key. A malformed sensor name or nonce counts as a missing
    header: only a broken client sends one.
    """
    text = str(error)
    for prefix, reason in (("missing header", "missing_header"),
                           ("unknown authorization", "bad_scheme"),
                           ("bad sensor", "missing_header"), ("bad nonce", "missing_header"),
                           ("bad timestamp", "bad_timestamp"), ("timestamp", "clock_skew"),
                           ("body does not match", "bad_body_hash"),
                           ("signature", "bad_signature"), ("nonce already", "replay")):
        if text.startswith(prefix):
            return reason
    return "bad_signature"  # a message this version does not know: refuse without detail


#: The reason codes a 401 or 409 may carry (``docs/protocol.md``).
REASON_CODES = ("missing_header", "bad_scheme", "bad_timestamp", "clock_skew", "bad_body_hash",
                "bad_signature", "replay", "unknown_sensor")
H_SERVER_TIME = "X-Ossensor-Server-Time"


class Metrics:
    """Prometheus counters, kept as plain Counters keyed by label tuples."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.chunks: Counter[str] = Counter()  # by result: stored, duplicate, malformed, failed
        self.packets = 0
        self.bytes = 0

    def render(self, sensors: dict[str, SensorState]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: list[tuple[dict[str, str], float]]):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                number = str(value) if isinstance(value, int) else repr(float(value))
                out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

        family("ossensor_vsensor_requests_total", "counter",
               "HTTP requests by endpoint and status.",
               [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
        family("ossensor_vsensor_auth_failures_total", "counter",
               "Requests refused by authentication, by reason.",
               [({"reason": r}, n) for r, n in sorted(self.auth_failures.items())])
        family("ossensor_vsensor_chunks_total", "counter", "Chunks received, by result.",
               [({"result": r}, n) for r, n in sorted(self.chunks.items())])
        family("ossensor_vsensor_packets_stored_total", "counter", "Packets stored.",
               [({}, self.packets)])
        family("ossensor_vsensor_bytes_stored_total", "counter", "pcapng bytes stored.",
               [({}, self.bytes)])
        family("ossensor_vsensor_sensor_packets_stored_total", "counter",
               "Packets stored per sensor.",
               [({"sensor": s.name}, s.packets) for s in sensors.values()])
        family("ossensor_vsensor_sensor_bytes_stored_total", "counter",
               "pcapng bytes stored per sensor.",
               [({"sensor": s.name}, s.bytes) for s in sensors.values()])
        family("ossensor_vsensor_sensor_chunks_stored_total", "counter",
               "Chunks stored per sensor.",
               [({"sensor": s.name}, s.chunks) for s in sensors.values()])
        family("ossensor_vsensor_sensor_kernel_drops", "gauge",
               "Kernel drops reported by the sensor's last heartbeat.",
               [({"sensor": s.name}, s.as_json()["kernel_drops"]) for s in sensors.values()])
        family("ossensor_vsensor_sensor_last_seen_seconds", "gauge",
               "Unix time of the sensor's last authenticated request.",
               [({"sensor": s.name}, s.last_seen or 0) for s in sensors.values()])
        return "\n".join(out) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class VSensor:
    """The state behind the application: sensors, their stores, nonces, metrics."""

    def __init__(self, settings: VSensorSettings) -> None:
        self.settings = settings
        self.codec = ChunkCodec()
        self.nonces = NonceCache(settings.skew_seconds)
        self.metrics = Metrics()
        self.sensors: dict[str, SensorState] = {}
        self.stores: dict[str, SensorStore] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._filter_notes: set[str] = set()
        self._filters: dict[tuple, FilterResult] = {}
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._retention: asyncio.Task[None] | None = None
        self._retention_wake = asyncio.Event()
        self._closed = False

    def now(self) -> float:
        return time.time() + self.settings.clock_offset

    # Authentication ----------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> tuple[Verified, bytes]:
        """Read the body and verify the request; raise an HTTP error response otherwise."""
        body = await request.read()
        try:
            verified = verify(self.settings.keys, request.method, request.raw_path,
                              request.headers, body, self.nonces, now=self.now(),
                              skew_seconds=self.settings.skew_seconds)
        except AuthError as exc:
            reason = auth_reason(exc)
            self.metrics.auth_failures[reason] += 1
            log.warning("refused %s %s from %s (sensor %r): %s", request.method, request.path,
                        request.remote, request.headers.get("X-Ossensor-Sensor", "?")[:64], exc)
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": reason, "server_time": self.now()}),
                content_type="application/json") from None
        if request.path != PATH_REGISTER:
            offered = request.headers.get(H_VERSION)
            if offered is not None and negotiate(_ints(offered)) is None:
                raise web.HTTPUpgradeRequired(
                    text=json.dumps({"supported": list(PROTOCOL_VERSIONS)}),
                    content_type="application/json")
        state = self._state(verified.sensor)
        state.last_seen = self.now()
        return verified, body

    def unknown_sensor(self, sensor: str, request: web.Request) -> web.Response | None:
        """409 when ``sensor`` has not registered since this process started, else None.

        409 rather than 401: the request is genuine, the sensor only has to register again
        (after a restart of the vSensor its filter and addresses are unknown here).
        """
        state = self.sensors.get(sensor)
        if state is not None and state.registered is not None:
            return None
        self.metrics.auth_failures["unknown_sensor"] += 1
        log.warning("refused %s %s from %s: sensor %r has not registered", request.method,
                    request.path, request.remote, sensor[:64])
        return web.json_response({"error": "unknown_sensor", "server_time": self.now()},
                                 status=409)

    def _state(self, sensor: str) -> SensorState:
        state = self.sensors.get(sensor)
        if state is None:
            state = self.sensors[sensor] = SensorState(sensor)
        return state

    def _lock(self, sensor: str) -> asyncio.Lock:
        return self._locks.setdefault(sensor, asyncio.Lock())

    # Filters -----------------------------------------------------------------------------

    async def filter_for(self, sensor: str, request: web.Request) -> str:
        local = _local_address(request)
        ports = set(self.settings.vsensor_ports)
        if local and local[1]:
            ports.add(local[1])
        state = self.sensors[sensor]
        others = [a for name, s in self.sensors.items() if name != sensor for a in s.addresses]
        nets = peer_networks(state.addresses, others)
        key = (local[0] if local else None, tuple(sorted(ports)), tuple(nets))
        result = self._filters.get(key)
        if result is None:
            # Compiling hundreds of networks takes seconds: off the event loop, and only when
            # the set of sensors changed (heartbeats reuse the result).
            result = await asyncio.to_thread(build_filter, key[0], key[1], nets)
            if len(self._filters) >= FILTER_CACHE_SIZE:
                self._filters.clear()
            self._filters[key] = result
        if result.peers_dropped and result.reason not in self._filter_notes:
            if len(self._filter_notes) >= FILTER_CACHE_SIZE:
                self._filter_notes.clear()
            self._filter_notes.add(result.reason)
            log.warning("filter for %r leaves out the %d peer networks (duplicates are stored "
                        "instead): %s", sensor, len(nets), result.reason)
        return result.expression

    # Handlers ----------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        verified, body = await self.authenticate(request)
        try:
            message = json.loads(body)
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
            if message.get("sensor", verified.sensor) != verified.sensor:
                raise ValueError(f"sensor {message.get('sensor')!r} in the body is not the "
                                 f"authenticated sensor {verified.sensor!r}")
            offered = [int(v) for v in message.get("versions", [])]
            addresses = [str(a) for a in message.get("addresses", [])]
            for address in addresses:
                parse_address(address)
            interfaces = [str(i) for i in message.get("interfaces", [])]
            software = str(message.get("software", ""))[:200]
        except (ValueError, TypeError) as exc:
            return _error(400, f"bad registration: {exc}")
        version = negotiate(offered)
        if version is None:
            log.warning("sensor %r speaks protocol versions %s, this vSensor %s",
                        verified.sensor, offered, list(PROTOCOL_VERSIONS))
            return web.json_response({"supported": list(PROTOCOL_VERSIONS)}, status=426)
        state = self._state(verified.sensor)
        state.version, state.software = version, software
        state.addresses, state.interfaces = addresses, interfaces
        state.registered = self.now()
        expression = await self.filter_for(verified.sensor, request)
        log.info("sensor %r registered from %s (protocol %d, %s, addresses %s)",
                 verified.sensor, request.remote, version, software, addresses)
        return web.json_response({"version": version, "filter": expression,
                                  "heartbeat_seconds": self.settings.heartbeat_seconds,
                                  "server_time": self.now()})

    async def heartbeat(self, request: web.Request) -> web.Response:
        verified, body = await self.authenticate(request)
        refused = self.unknown_sensor(verified.sensor, request)
        if refused is not None:
            return refused
        try:
            message = json.loads(body) if body else {}
            interfaces = message.get("interfaces", {}) if isinstance(message, dict) else None
            if not isinstance(interfaces, dict):
                raise ValueError("'interfaces' is not an object")
            kernel = {str(name): {"packets": int(v.get("packets", 0)),
                                  "drops": int(v.get("drops", 0))}
                      for name, v in interfaces.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f"bad heartbeat: {exc}")
        self.sensors[verified.sensor].kernel = kernel
        return web.json_response({"filter": await self.filter_for(verified.sensor, request)})

    async def chunks(self, request: web.Request) -> web.Response:
        verified, body = await self.authenticate(request)
        sensor = verified.sensor
        refused = self.unknown_sensor(sensor, request)
        if refused is not None:
            return refused
        try:
            sequence = int(request.headers[H_CHUNK_SEQUENCE])
        except (KeyError, ValueError):
            self.metrics.chunks["malformed"] += 1
            return _error(400, f"missing or bad {H_CHUNK_SEQUENCE} header")
        try:
            # Decompressing and parsing a large chunk takes a while: off the event loop.
            chunk = await asyncio.to_thread(self.codec.decode, body)
        except ValueError as exc:
            self.metrics.chunks["malformed"] += 1
            log.warning("malformed chunk %d from %r: %s", sequence, sensor, exc)
            return _error(400, str(exc))
        if chunk.sensor != sensor:
            self.metrics.chunks["malformed"] += 1
            log.warning("chunk %d from %r names sensor %r", sequence, sensor, chunk.sensor)
            return _error(400, f"the chunk belongs to sensor {chunk.sensor!r}, not {sensor!r}")
        if chunk.sequence != sequence:
            self.metrics.chunks["malformed"] += 1
            return _error(400, f"{H_CHUNK_SEQUENCE} {sequence} differs from the chunk's "
                               f"sequence {chunk.sequence}")
        if request.headers.get(H_TEST, "").strip() == "1":
            # A sensor checking the whole path (key, clock, TLS, chunk format) before it
            # captures: nothing is stored and the sequence is not remembered.
            self.metrics.chunks["test"] += 1
            log.info("test chunk %d from %r: %d packets verified, not stored", sequence, sensor,
                     chunk.packets)
            return web.json_response({"test": True, "packets": chunk.packets})
        # Shielded: should the client go away mid-write, the chunk is still stored and its
        # sequence remembered, so the sensor's retry is answered as a duplicate.
        return await asyncio.shield(self._store_chunk(sensor, chunk))

    async def _store_chunk(self, sensor: str, chunk: Chunk) -> web.Response:
        state = self.sensors[sensor]
        async with self._lock(sensor):
            if self._closed:
                return _error(503, "the vSensor is shutting down",
                              **{"Retry-After": str(RETRY_AFTER_SECONDS)})
            store = self.stores.get(sensor)
            if store is None:
                store = self.stores[sensor] = SensorStore(
                    self.settings.data_dir, sensor, self.settings.rotate_bytes,
                    self.settings.rotate_seconds)
            if store.seen(chunk.sequence):
                state.duplicates += 1
                self.metrics.chunks["duplicate"] += 1
                return web.json_response({"duplicate": True})
            completed = store.files_completed
            try:
                added = await asyncio.to_thread(store.write_chunk, chunk)
            except StoreError as exc:
                self.metrics.chunks["failed"] += 1
                log.error("%s (%s); answering 507", exc,
                          errno.errorcode.get(exc.errno or 0, "no errno"))
                return _error(507, f"the vSensor cannot store chunks now: "
                                   f"{_short_reason(exc.errno)}",
                              **{"Retry-After": str(RETRY_AFTER_SECONDS)})
            store.remember(chunk.sequence)
            if store.files_completed != completed:
                self._retention_wake.set()
        self._wake.set()
        state.packets += chunk.packets
        state.bytes += added
        state.chunks += 1
        self.metrics.chunks["stored"] += 1
        self.metrics.packets += chunk.packets
        self.metrics.bytes += added
        return web.json_response({"stored": chunk.packets})

    # Status pages ------------------------------------------------------------------------

    def _check_admin(self, request: web.Request) -> None:
        token = self.settings.admin_token
        if not token:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "admin token required"}),
                content_type="application/json", headers={"WWW-Authenticate": "Bearer"})

    async def status_json(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        return web.json_response({
            "vsensor": __version__, "server_time": self.now(),
            "sensors": [s.as_json() for s in sorted(self.sensors.values(), key=lambda s: s.name)],
        })

    async def status_html(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        rows = []
        for s in sorted(self.sensors.values(), key=lambda s: s.name):
            data = s.as_json()
            cells = [s.name, str(s.version or ""), ", ".join(s.addresses), _when(s.registered),
                     _when(s.last_seen), str(s.packets), str(s.bytes), str(s.chunks),
                     str(data["kernel_drops"])]
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("sensor", "protocol", "addresses", "registered",
                                                   "last seen", "packets", "bytes", "chunks",
                                                   "kernel drops"))
        page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>ossensor vSensor"
                "</title></head><body><h1>ossensor vSensor</h1>"
                f"<table border=\"1\"><tr>{head}</tr>{''.join(rows)}</table></body></html>")
        return web.Response(text=page, content_type="text/html")

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        return web.Response(text=self.metrics.render(self.sensors),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self._timer = asyncio.create_task(self._rotate_by_age(), name="vsensor file rotation")
        if self.settings.retain_seconds is not None or self.settings.retain_bytes is not None:
            self._retention = asyncio.create_task(self._retain(), name="vsensor retention")

    async def close(self, app: web.Application | None = None) -> None:
        """Complete every open file (``.part`` renamed); later chunks get 503."""
        self._closed = True
        for task in (self._timer, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sensor, store in list(self.stores.items()):
            async with self._lock(sensor):
                await asyncio.to_thread(store.close)

    async def _rotate_by_age(self) -> None:
        while True:
            due = [d for d in (s.next_due() for s in list(self.stores.values())) if d is not None]
            delay = (min(due) - time.monotonic()) if due else self.settings.rotate_seconds
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                # A chunk that opens the first file wakes us to schedule its deadline.
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=min(max(delay, 0.05), 3600.0) if due else 3600.0)
                continue
            for sensor, store in list(self.stores.items()):
                async with self._lock(sensor):
                    completed = store.files_completed
                    try:
                        await asyncio.to_thread(store.finish_aged)
                    except Exception:  # keep rotating the other sensors' files
                        log.exception("rotating the files of %r failed", sensor)
                    if store.files_completed != completed:
                        self._retention_wake.set()

    async def _retain(self) -> None:
        """Retention on a timer and after every completed file (``.part`` files are kept)."""
        settings = self.settings
        while True:
            self._retention_wake.clear()
            try:
                await asyncio.to_thread(enforce_retention, settings.data_dir,
                                        settings.retain_seconds, settings.retain_bytes)
            except Exception:  # never stop retention: a full disk would follow
                log.exception("retention in %s failed", settings.data_dir)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._retention_wake.wait(),
                                       timeout=settings.retention_interval)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return []


def _local_address(request: web.Request) -> tuple[str, int] | None:
    """The address and port the request came to (the vSensor side of the connection)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname:
        return None
    host = str(sockname[0]).split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:  # an IPv4 client on a dual-stack socket
        host = host[7:]
    return host, int(sockname[1])


def _short_reason(code: int | None) -> str:
    return {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "data folder not writable", errno.EPERM: "data folder not writable",
            errno.EROFS: "data folder is read-only",
            errno.EEXIST: "data folder not usable",
            errno.ENOTDIR: "data folder not usable"}.get(code or 0, "storage error")


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp)) if stamp else ""


VSENSOR = web.AppKey("vsensor", VSensor)


@web.middleware
async def _count_requests(request: web.Request, handler) -> web.StreamResponse:
    vsensor = request.app[VSENSOR]
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "other"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        vsensor.metrics.requests[(endpoint, str(exc.status))] += 1
        raise
    except Exception:
        vsensor.metrics.requests[(endpoint, "500")] += 1
        raise
    vsensor.metrics.requests[(endpoint, str(response.status))] += 1
    return response


async def _add_server_time(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the vSensor's clock, so a sensor can see its own skew."""
    response.headers[H_SERVER_TIME] = f"{request.app[VSENSOR].now():.3f}"


def create_app(settings: VSensorSettings) -> web.Application:
    """The vSensor as an aiohttp application; files are completed in its cleanup."""
    app = web.Application(client_max_size=settings.client_max_size,
                          middlewares=[_count_requests])
    vsensor = app[VSENSOR] = VSensor(settings)
    app.router.add_post(PATH_REGISTER, vsensor.register)
    app.router.add_post(PATH_CHUNKS, vsensor.chunks)
    app.router.add_post(PATH_HEARTBEAT, vsensor.heartbeat)
    app.router.add_get("/status", vsensor.status_html)
    app.router.add_get("/status.json", vsensor.status_json)
    app.router.add_get("/metrics", vsensor.metrics_page)
    app.on_response_prepare.append(_add_server_time)
    app.on_startup.append(vsensor.start)
    app.on_cleanup.append(vsensor.close)
    return app
