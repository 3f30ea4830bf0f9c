"""``POST /api/v1/register`` and ``POST /api/v1/heartbeat``: a sensor joins and stays known.

Registration tells the vSensor what a sensor claims (addresses, workload ranges) and which
features it has; the answer carries the negotiated protocol version and the sensor's filter.
Heartbeats carry kernel counters and get the filter again (or only its id, when unchanged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from typing import Any

from aiohttp import web

from ossensor_core.wire.chunk import VERSIONS as CHUNK_VERSIONS
from ossensor_core.wire.names import PROTOCOL_VERSIONS, Reason
from ossensor_core.wire.signing import DIGESTS, negotiate

from . import antigena
from .auth import Authenticator
from .claims import DEFAULT_CLAIMS_ALLOW, IGNORED_SHOWN, ClaimPolicy, parse_allow
from .filters import claimed_set, parse_address
from .cluster.registry import MAX_TEXT, ClusterUnavailable, SharedRegistry
from .registry import SensorRegistry, SensorState
from .sensor_filters import SensorFilters
from .settings import VSensorSettings

log = logging.getLogger("ossensor_vsensor")

#: Registrations and heartbeats are small (addresses, workload ranges, interface counters):
#: larger bodies get 413 from their Content-Length, unread, and never reach the JSON parser.
JSON_BODY_LIMIT = 1 << 20


class Registrar:
    """Registers sensors and takes their heartbeats."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry,
                 auth: Authenticator, filters: SensorFilters) -> None:
        self.settings = settings
        self.registry = registry
        self.auth = auth
        self.filters = filters
        self.claims = ClaimPolicy(parse_allow((*DEFAULT_CLAIMS_ALLOW, *settings.claims_allow)),
                                  settings.claims_max_prefix_v4, settings.claims_max_prefix_v6)
        self._background: set[asyncio.Task[None]] = set()
        #: Cluster mode: the registry shared with the other replicas (set at start).
        self.shared: SharedRegistry | None = None

    async def register(self, request: web.Request) -> web.Response:
        verified, body = await self.auth.authenticate(request, JSON_BODY_LIMIT)
        sensor = verified.sensor
        try:
            message = json_object(body)
            if message.get("sensor", sensor) != sensor:
                raise ValueError(f"sensor {message.get('sensor')!r} in the body is not the "
                                 f"authenticated sensor {sensor!r}")
            offered = [int(v) for v in message.get("versions", [])]
            addresses = [str(a) for a in message.get("addresses", [])]
            for address in addresses:
                parse_address(address)
            interfaces = [str(i) for i in message.get("interfaces", [])]
            software = str(message.get("software", ""))[:200]
            workloads = [str(w) for w in message.get("workloads", [])]
            primary = message.get("primary_address")
            claimed_addresses, claimed_workloads, ignored = self.claims.sort(
                addresses + ([str(primary)] if primary else []), workloads)
            claim = claimed_set(claimed_addresses, claimed_workloads)
            features = frozenset(str(f) for f in message.get("features", []))
        except (ValueError, TypeError, OverflowError) as exc:
            return bad_json(request, sensor, f"bad registration: {exc}")
        version = negotiate(offered)
        if version is None:
            log.warning("sensor %r speaks protocol versions %s, this vSensor %s",
                        sensor, offered, list(PROTOCOL_VERSIONS))
            return web.json_response({"supported": list(PROTOCOL_VERSIONS)}, status=426)
        instance = str(message.get("instance", ""))[:64]
        if message.get("probe") is True:
            return self._probe_answer(sensor, instance, version, request)
        refused = self.auth.refuse_name_in_use(sensor, instance, request)
        if refused is not None:
            return refused
        state = self.registry.state(sensor)
        if self.shared is not None:  # cluster mode: the name across every replica
            refused = await self._register_shared(request, dataclasses.replace(
                state, instance=instance, version=version, software=software,
                addresses=addresses, interfaces=interfaces, workloads=workloads,
                features=features, primary=str(primary or "")[:MAX_TEXT],
                registered=self.settings.now(), last_seen=self.settings.now(),
                replica=self.shared.replica))
            if refused is not None:
                return refused
            state.replica = self.shared.replica
        state.instance = instance
        state.version, state.software = version, software
        state.addresses, state.interfaces = addresses, interfaces
        if claim != state.claim or state.registered is None:
            self.filters.claims_changed()
            # The others' filters change: tell them now (over Antigena's websocket).
            hub = request.app[antigena.ANTIGENA]
            task = asyncio.get_running_loop().create_task(hub.filters_changed(sensor))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        state.workloads, state.claim, state.features = workloads, claim, features
        state.primary = str(primary or "")[:MAX_TEXT]
        state.ignored_claims, state.ignored_claims_count = ignored[:IGNORED_SHOWN], len(ignored)
        if ignored:
            log.warning("sensor %r: %d claims ignored (%s)", sensor, len(ignored),
                        ", ".join(f"{i['claim']}: {i['reason']}" for i in ignored[:4]))
        state.registered = self.settings.now()
        request.app[antigena.ANTIGENA].learn(sensor, request)  # actions never cut this path
        filter_fields = await self.filters.filter_for(sensor, request)
        log.info("sensor %r registered from %s (protocol %d, %s, addresses %s, workloads %s)",
                 sensor, request.remote, version, software, addresses, workloads)
        direct = self.settings.direct
        extra = {"direct": {"host": direct[0], "port": direct[1]}} if direct else {}
        return web.json_response({"version": version, **filter_fields, **extra,
                                  "digests": list(DIGESTS),
                                  "chunk_versions": list(CHUNK_VERSIONS),
                                  "heartbeat_seconds": self.settings.heartbeat_seconds,
                                  "server_time": self.settings.now()})

    async def _register_shared(self, request: web.Request,
                               candidate: SensorState) -> web.Response | None:
        """Cluster mode: write ``candidate`` to the shared registry unless another live
        instance holds the name on some replica (``name_in_use``, as on one vSensor); 503
        ``busy`` with ``Retry-After`` while NATS does not answer."""
        assert self.shared is not None
        try:
            holder = await self.shared.register(candidate)
        except ClusterUnavailable as exc:
            raise self.auth.cluster_unavailable(request, str(exc)) from None
        except ValueError as exc:  # too large for the shared registry
            return bad_json(request, candidate.name, f"bad registration: {exc}")
        if holder is None:
            return None
        return self.auth.refuse_name_held(candidate.name, candidate.instance, holder, request)

    def _probe_answer(self, sensor: str, instance: str, version: int,
                      request: web.Request) -> web.Response:
        """A registration marked ``"probe": true`` (``ossensor diagnose``): verified and
        answered, nothing recorded, so a diagnosis never disturbs a running sensor."""
        state = self.registry.get(sensor)
        live = bool(state and state.registered
                    and self.registry.held_by_another(state, instance)) or bool(
            self.shared is not None  # cluster mode: held through another replica
            and self.shared.holds(self.registry.remote.get(sensor), instance))
        log.info("registration probe for %r from %s (protocol %d)", sensor, request.remote,
                 version)
        return web.json_response({
            "version": version, "probe": True, "name_in_use": live,
            "filter": self.filters.own_expression(request),
            "digests": list(DIGESTS), "heartbeat_seconds": self.settings.heartbeat_seconds,
            "server_time": self.settings.now()})

    async def heartbeat(self, request: web.Request) -> web.Response:
        verified, body = await self.auth.authenticate(request, JSON_BODY_LIMIT)
        sensor = verified.sensor
        refused = self.auth.refuse_unless_holder(sensor, request)
        if refused is not None:
            return refused
        try:
            message = json_object(body) if body else {}
            kernel = _kernel_counters(message.get("interfaces", {}))
            known_id = message.get("peer_ranges_id")
            note = str(message.get("filter_note") or "")[:500]
        except (ValueError, TypeError, OverflowError) as exc:
            return bad_json(request, sensor, f"bad heartbeat: {exc}")
        state = self.registry.sensors[sensor]
        state.kernel = kernel
        if message.get("leaving") is True:
            # A sensor stopping cleanly: its name is free for the next instance at once.
            log.info("sensor %r (instance %s) is stopping", sensor, state.instance[:12])
            state.last_seen = None
            state.instance = ""
            self.registry.touch(state, changed=True)
            return web.json_response({})
        if note != state.filter_note:
            state.filter_note = note
            self.registry.touch(state, changed=True)
            if note:
                log.warning("sensor %r reports about its filter: %s", sensor, note)
        return web.json_response(await self.filters.filter_for(
            sensor, request, known_id if isinstance(known_id, str) else None))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object from a sensor, refusing what Python's parser takes beyond JSON
    (``Infinity``, ``NaN``), numbers that overflow to infinity (``1e999``) and strings that
    are not text (lone surrogates)."""
    message = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    # "\ud800" is valid JSON but no character: it would break every log line and page that
    # shows it. Encoding the whole message finds one (UnicodeEncodeError is a ValueError).
    json.dumps(message, ensure_ascii=False).encode()
    return message


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def bad_json(request: web.Request, sensor: str, message: str) -> web.Response:
    """``400`` with the ``bad_json`` reason code and the message, logged once."""
    log.warning("refused %s %s from %s (sensor %r): %s", request.method, request.path,
                request.remote, sensor, message[:300])
    return web.json_response({"error": message[:300], "reason": Reason.BAD_JSON}, status=400)


def _kernel_counters(interfaces: Any) -> dict[str, dict[str, int]]:
    """A heartbeat's ``interfaces`` object: name -> kernel packet and drop counters."""
    if not isinstance(interfaces, dict):
        raise ValueError("'interfaces' is not an object")
    counters = {}
    for name, values in interfaces.items():
        if not isinstance(values, dict):
            raise ValueError(f"interface {str(name)[:64]!r}: not an object")
        counters[str(name)] = {"packets": int(values.get("packets", 0)),
                               "drops": int(values.get("drops", 0))}
    return counters
