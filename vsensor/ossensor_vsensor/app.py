"""The vSensor's HTTP application (aiohttp): the server side of ``docs/protocol.md``.

Usage (the CLI does this over TLS)::

    settings = VSensorSettings(data_dir=Path("/var/lib/vsensor"), keys=["..."])
    app = create_app(settings)  # run with web.AppRunner + web.TCPSite(ssl_context=...)

Every sensor request is verified with :func:`ossensor_core.wire.signing.verify` before its body is
looked at; a failure answers 401 with a generic reason, logs the precise one (never a key) and
stores nothing. The status pages (``/status``, ``/status.json``, ``/metrics``) show counters and
names only, never keys or packet contents, and need ``Authorization: Bearer <admin token>`` when
an admin token is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
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

from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.wire.chunk import VERSIONS as CHUNK_VERSIONS, ChunkCodec
from ossensor_core.pipeline.contracts import Chunk
from ossensor_core.wire.signing import (DEFAULT_SKEW_SECONDS, DIGESTS, H_INSTANCE, H_VERSION,
                                    PATH_CHUNKS, PATH_HEARTBEAT, PATH_REGISTER, PROTOCOL_VERSIONS,
                                    AuthError, NonceCache, Verified, negotiate, verify)

from . import __version__
from . import antigena
from .filters import (FEATURE_PEER_RANGES, FilterResult, build_filter, claimed_once,
                      claimed_set, parse_address, peer_set, self_expression)
from .store import SensorStore, StoreError, enforce_retention, recover

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
    #: ``(host, port)`` that sensors should use once registered, when they register through a
    #: load balancer in front of several vSensors (None: keep the address they used).
    direct: tuple[str, int] | None = None

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
    #: Interface -> {"packets": n, "drops": n} (kernel counters): set by every heartbeat,
    #: moved forward by the interface table of v2 chunks in between.
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Workload ranges (pod CIDRs) behind the sensor, and what it claims with its addresses.
    workloads: list[str] = field(default_factory=list)
    claim: AddressSet = field(default_factory=AddressSet)
    features: frozenset[str] = frozenset()
    #: The sensor's last word on its filter (e.g. the peer part did not fit), "" when fine.
    filter_note: str = ""
    #: The instance id of the process that registered (``X-Ossensor-Instance``), and the last
    #: other live instance that tried to use the same name (refused, see ``name_in_use``).
    instance: str = ""
    conflict: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "software": self.software,
            "addresses": self.addresses, "interfaces": self.interfaces,
            "registered": self.registered, "last_seen": self.last_seen,
            "packets": self.packets, "bytes": self.bytes, "chunks": self.chunks,
            "duplicates": self.duplicates, "workloads": self.workloads,
            "filter_note": self.filter_note, "instance": self.instance,
            "name_conflict": self.conflict,
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
    return error.code


#: The reason codes a 401 or 409 may carry (``docs/protocol.md``).
REASON_CODES = ("missing_header", "bad_scheme", "bad_timestamp", "clock_skew", "bad_body_hash",
                "bad_signature", "replay", "unknown_sensor", "name_in_use")
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
               "Kernel drops reported by the sensor's last heartbeat or chunk.",
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
        #: The Antigena hub (antigena.setup): tells connected sensors when filters changed.
        self.antigena: Any = None
        self._background: set[asyncio.Task[None]] = set()
        self.codec = ChunkCodec()
        self.nonces = NonceCache(settings.skew_seconds)
        self.metrics = Metrics()
        self.sensors: dict[str, SensorState] = {}
        self.stores: dict[str, SensorStore] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._filter_notes: set[str] = set()
        self._filters: dict[tuple, FilterResult] = {}
        self._claims_version = 0  # bumped when a claim changes or a sensor expires
        self._once: tuple[int, AddressSet, str] | None = None
        self._peers: dict[AddressSet, AddressSet] = {}
        self._live_checked = 0.0
        self._live: frozenset[str] = frozenset()
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
        instance = request.headers.get(H_INSTANCE, "")
        if not state.instance or not instance or instance == state.instance:
            state.last_seen = self.now()  # not by another instance under the same name
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

    def name_in_use(self, sensor: str, instance: str,
                    request: web.Request) -> web.Response | None:
        """409 ``name_in_use`` when another instance (another process, usually another host)
        holds ``sensor`` and was seen within three heartbeats, else None.

        Two live sensors with one name are reported, never merged: their packets would land in
        one folder and their filters would fight. The newcomer keeps its chunks and retries; once
        the other falls silent (a replaced pod), it takes the name over.
        """
        state = self.sensors.get(sensor)
        if not instance or state is None or not self._held_by_another(state, instance):
            return None
        state.conflict = {"instance": instance[:64], "address": str(request.remote),
                          "at": self.now()}
        self.metrics.auth_failures["name_in_use"] += 1
        log.warning("refused %s %s from %s: sensor name %r is in use by instance %s (seen %.0f s "
                    "ago), this is instance %s: two sensors with one name (OSSENSOR_NAME)",
                    request.method, request.path, request.remote, sensor[:64],
                    state.instance[:12], self.now() - state.last_seen, instance[:12])
        return web.json_response({"error": "name_in_use", "server_time": self.now()},
                                 status=409)

    def _held_by_another(self, state: SensorState, instance: str) -> bool:
        """Whether an instance other than ``instance`` holds the name and was seen within three
        heartbeats."""
        return bool(state.instance and instance != state.instance
                    and state.last_seen is not None
                    and self.now() - state.last_seen <= 3 * self.settings.heartbeat_seconds)

    def _state(self, sensor: str) -> SensorState:
        state = self.sensors.get(sensor)
        if state is None:
            state = self.sensors[sensor] = SensorState(sensor)
        return state

    def _lock(self, sensor: str) -> asyncio.Lock:
        return self._locks.setdefault(sensor, asyncio.Lock())

    # Filters -----------------------------------------------------------------------------

    def _claimed_once(self) -> tuple[AddressSet, str]:
        """What exactly one live sensor claims, and its digest (``filters.py``); recomputed
        when a claim changed (a sweep: about 20 ms for 5,000 sensors).

        Sensors silent for six heartbeats (at least a minute) are left out (checked once a
        second): that only makes the others keep more (duplicates, never a gap)."""
        now = self.now()
        if now - self._live_checked >= 1.0 or self._once is None \
                or self._once[0] != self._claims_version:
            self._live_checked = now
            horizon = now - max(60.0, 6 * self.settings.heartbeat_seconds)
            live = frozenset(n for n, s in self.sensors.items()
                             if s.registered is not None and (s.last_seen or 0) >= horizon)
            if live != self._live:
                self._live = live
                self._claims_version += 1
        if self._once is None or self._once[0] != self._claims_version:
            once = claimed_once(self.sensors[n].claim for n in self._live)
            self._once = (self._claims_version, once, once.digest())
            self._peers.clear()
        return self._once[1], self._once[2]

    def _peers_of(self, state: SensorState) -> tuple[str, AddressSet]:
        """The id of the ranges ``state``'s sensor drops as a packet's lower address (cheap:
        from the digest of the claims and its own claim), and what exactly one sensor claims,
        from which :meth:`_peer_set` makes the ranges when they have to be sent."""
        once, digest = self._claimed_once()
        return hashlib.sha256(f"{digest} {state.claim.texts()}".encode()).hexdigest()[:16], once

    def _peer_set(self, state: SensorState, once: AddressSet) -> AddressSet:
        peers = self._peers.get(state.claim)
        if peers is None:
            if len(self._peers) >= FILTER_CACHE_SIZE:
                self._peers.clear()
            peers = self._peers[state.claim] = peer_set(state.claim, once)
        return peers

    def _own_endpoint(self, request: web.Request) -> tuple[tuple[str, int] | None, set[int]]:
        """The address a request came to and the ports sensors use: their traffic to the
        vSensor, which their filters leave out."""
        local = _local_address(request)
        ports = set(self.settings.vsensor_ports)
        if local and local[1]:
            ports.add(local[1])
        return local, ports

    async def filter_for(self, sensor: str, request: web.Request,
                         known_id: str | None = None) -> dict[str, Any]:
        """The filter fields of a registration or heartbeat answer (``docs/protocol.md``)."""
        local, ports = self._own_endpoint(request)
        state = self.sensors[sensor]
        peers_id, once = self._peers_of(state)
        if FEATURE_PEER_RANGES in state.features:
            # The sensor generates BPF itself; the ranges are sent (and computed) only when
            # they changed, so a steady heartbeat costs next to nothing here.
            ranges: dict[str, Any] = {"id": peers_id, "rule": "lower-address"}
            if known_id != peers_id:
                ranges["ranges"] = self._peer_set(state, once).texts()
            own = self_expression(local[0], ports) if local else ""
            return {"filter": own, "peer_ranges": ranges}
        peers = self._peer_set(state, once)
        key = (local[0] if local else None, tuple(sorted(ports)), peers)
        result = self._filters.get(key)
        if result is None:
            # Compiling hundreds of networks takes seconds: off the event loop, and only when
            # the set of sensors changed (heartbeats reuse the result).
            result = await asyncio.to_thread(build_filter, key[0], key[1], peers)
            if len(self._filters) >= FILTER_CACHE_SIZE:
                self._filters.clear()
            self._filters[key] = result
        if result.peers_dropped and result.reason not in self._filter_notes:
            if len(self._filter_notes) >= FILTER_CACHE_SIZE:
                self._filter_notes.clear()
            self._filter_notes.add(result.reason)
            log.warning("filter for %r leaves out the peer part (%s; duplicates are stored "
                        "instead): %s", sensor, peers.summary(), result.reason)
        return {"filter": result.expression}

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
            workloads = [str(w) for w in message.get("workloads", [])]
            primary = message.get("primary_address")
            claim = claimed_set(addresses + ([str(primary)] if primary else []), workloads)
            features = frozenset(str(f) for f in message.get("features", []))
        except (ValueError, TypeError) as exc:
            return _error(400, f"bad registration: {exc}")
        version = negotiate(offered)
        if version is None:
            log.warning("sensor %r speaks protocol versions %s, this vSensor %s",
                        verified.sensor, offered, list(PROTOCOL_VERSIONS))
            return web.json_response({"supported": list(PROTOCOL_VERSIONS)}, status=426)
        instance = str(message.get("instance", ""))[:64]
        if message.get("probe") is True:
            return self._probe_answer(verified.sensor, instance, version, request)
        refused = self.name_in_use(verified.sensor, instance, request)
        if refused is not None:
            return refused
        state = self._state(verified.sensor)
        state.instance = instance
        state.version, state.software = version, software
        state.addresses, state.interfaces = addresses, interfaces
        claims_changed = claim != state.claim or state.registered is None
        if claims_changed:
            self._claims_version += 1
            if self.antigena is not None:  # the others' filters change: tell them now
                task = asyncio.get_running_loop().create_task(
                    self.antigena.filters_changed(verified.sensor))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        state.workloads, state.claim, state.features = workloads, claim, features
        state.registered = self.now()
        filter_fields = await self.filter_for(verified.sensor, request)
        log.info("sensor %r registered from %s (protocol %d, %s, addresses %s, workloads %s)",
                 verified.sensor, request.remote, version, software, addresses, workloads)
        extra = {"direct": {"host": self.settings.direct[0], "port": self.settings.direct[1]}} \
            if self.settings.direct else {}
        return web.json_response({"version": version, **filter_fields, **extra,
                                  "digests": list(DIGESTS),
                                  "chunk_versions": list(CHUNK_VERSIONS),
                                  "heartbeat_seconds": self.settings.heartbeat_seconds,
                                  "server_time": self.now()})

    def _probe_answer(self, sensor: str, instance: str, version: int,
                      request: web.Request) -> web.Response:
        """A registration marked ``"probe": true`` (``ossensor diagnose``): verified and
        answered, nothing recorded, so a diagnosis never disturbs a running sensor."""
        local, ports = self._own_endpoint(request)
        state = self.sensors.get(sensor)
        live = bool(state and state.registered and self._held_by_another(state, instance))
        log.info("registration probe for %r from %s (protocol %d)", sensor, request.remote,
                 version)
        return web.json_response({
            "version": version, "probe": True, "name_in_use": live,
            "filter": self_expression(local[0], ports) if local else "",
            "digests": list(DIGESTS), "heartbeat_seconds": self.settings.heartbeat_seconds,
            "server_time": self.now()})

    async def heartbeat(self, request: web.Request) -> web.Response:
        verified, body = await self.authenticate(request)
        refused = self.unknown_sensor(verified.sensor, request) or self.name_in_use(
            verified.sensor, request.headers.get(H_INSTANCE, ""), request)
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
            known_id = message.get("peer_ranges_id")
            note = str(message.get("filter_note") or "")[:500]
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, f"bad heartbeat: {exc}")
        state = self.sensors[verified.sensor]
        state.kernel = kernel
        if isinstance(message, dict) and message.get("leaving") is True:
            # A sensor stopping cleanly: its name is free for the next instance at once.
            log.info("sensor %r (instance %s) is stopping", verified.sensor, state.instance[:12])
            state.last_seen = None
            state.instance = ""
            return web.json_response({})
        if note != state.filter_note:
            state.filter_note = note
            if note:
                log.warning("sensor %r reports about its filter: %s", verified.sensor, note)
        return web.json_response(await self.filter_for(
            verified.sensor, request, known_id if isinstance(known_id, str) else None))

    async def chunks(self, request: web.Request) -> web.Response:
        verified, body = await self.authenticate(request)
        sensor = verified.sensor
        # A test chunk (``ossensor diagnose``) is verified and decoded, never stored: it needs
        # no registration, so a diagnosis works without disturbing a running sensor.
        if request.headers.get(H_TEST, "").strip() != "1":
            refused = self.unknown_sensor(sensor, request) or self.name_in_use(
                sensor, request.headers.get(H_INSTANCE, ""), request)
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
        # The body's instance (v2) is covered by the signature; the header, on which
        # name_in_use decided, is not. A chunk whose two disagree is refused.
        header_instance = request.headers.get(H_INSTANCE, "")
        if chunk.instance and chunk.instance != header_instance:
            self.metrics.chunks["malformed"] += 1
            log.warning("chunk %d from %r names instance %r, the request %r", sequence, sensor,
                        chunk.instance[:64], header_instance[:64])
            return _error(400, f"the chunk belongs to instance {chunk.instance[:64]!r}, not "
                               f"{header_instance[:64]!r} ({H_INSTANCE})")
        if request.headers.get(H_TEST, "").strip() == "1":
            # A sensor checking the whole path (key, clock, TLS, chunk format) before it
            # captures: nothing is stored and the sequence is not remembered.
            self.metrics.chunks["test"] += 1
            log.info("test chunk %d from %r: %d packets verified, not stored", sequence, sensor,
                     chunk.packets)
            return web.json_response({"test": True, "packets": chunk.packets})
        self._note_counters(self.sensors[sensor], chunk)
        # Shielded: should the client go away mid-write, the chunk is still stored and its
        # sequence remembered, so the sensor's retry is answered as a duplicate.
        return await asyncio.shield(self._store_chunk(sensor, chunk))

    @staticmethod
    def _note_counters(state: SensorState, chunk: Chunk) -> None:
        """Kernel counters from a v2 chunk's interface table. They only move forward: a chunk
        that waited in a spool carries older counters than the last heartbeat, which stays
        authoritative (it also resets them when a capture was reopened)."""
        for row in chunk.interfaces:
            known = state.kernel.get(row.name)
            if known is None or (row.packets >= known.get("packets", 0)
                                 and row.drops >= known.get("drops", 0)):
                state.kernel[row.name] = {"packets": row.packets, "drops": row.drops}

    async def _store_chunk(self, sensor: str, chunk: Chunk) -> web.Response:
        state = self.sensors[sensor]
        async with self._lock(sensor):
            if self._closed:
                return _error(503, "the vSensor is shutting down",
                              **{"Retry-After": str(RETRY_AFTER_SECONDS)})
            store = self.stores.get(sensor)
            if store is None:
                store = SensorStore(self.settings.data_dir, sensor, self.settings.rotate_bytes,
                                    self.settings.rotate_seconds)
                await asyncio.to_thread(store.load)
                self.stores[sensor] = store
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
            "antigena": request.app[antigena.ANTIGENA].status(),
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
                f"<table border=\"1\"><tr>{head}</tr>{''.join(rows)}</table>"
                f"{antigena.status_rows(request.app[antigena.ANTIGENA])}</body></html>")
        return web.Response(text=page, content_type="text/html")

    async def metrics_page(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        return web.Response(text=self.metrics.render(self.sensors),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        await asyncio.to_thread(self._recover)
        self._timer = asyncio.create_task(self._rotate_by_age(), name="vsensor file rotation")
        if self.settings.retain_seconds is not None or self.settings.retain_bytes is not None:
            self._retention = asyncio.create_task(self._retain(), name="vsensor retention")

    def _recover(self) -> None:
        """Complete what a crashed run left as ``.part`` files, cut back to the last
        acknowledged chunk (see store.py)."""
        try:
            folders = [f for f in self.settings.data_dir.iterdir()
                       if f.is_dir() and not f.name.startswith(".")]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot list %s to recover unfinished files: %s", self.settings.data_dir,
                      exc.strerror or exc)
            return
        for folder in folders:
            try:
                for line in recover(folder):
                    log.warning("recovered %s/%s", folder.name, line)
            except OSError as exc:
                log.error("cannot recover the unfinished files of %s: %s", folder,
                          exc.strerror or exc)

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
    antigena.setup(app, vsensor)
    app.on_response_prepare.append(_add_server_time)
    app.on_startup.append(vsensor.start)
    app.on_cleanup.append(vsensor.close)
    return app
