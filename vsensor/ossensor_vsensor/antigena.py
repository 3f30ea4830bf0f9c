"""Antigena on the vSensor: response actions, the operator API, the sensors' websocket, reports.

An operator blocks TCP connections for a while (``ossensor-vsensor antigena ... block``); the
action goes at once to every connected sensor it targets, over a websocket that each sensor holds
open (``GET /api/v1/antigena/ws``, upgrade request signed with the sensors' HMAC scheme). A
sensor that (re)connects first receives every action still in force (``sync``). Every
``ANTIGENA_TIME_PERIOD`` seconds each sensor reports what it did; the totals appear in
``/status`` and ``/status.json``.

The operator API (``/api/v1/antigena/actions``) is authenticated by ``VSENSOR_ADMIN_TOKEN``
(``Authorization: Bearer``) and nothing else: a host that holds the sensors' key cannot issue
actions. Without an admin token the operator API is disabled (403). The message formats are in
``docs/antigena.md``.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from ossensor_core.wire.antigena import (MAX_ACTIONS_IN_FORCE, MAX_DURATION_SECONDS,
                                         MAX_EXEMPT_ENDPOINTS, ActionCounts, IPAddress,
                                         IPNetwork, parse_network)
from ossensor_core.wire.antigena import BlockAction as Action
from ossensor_core.wire.names import PATH_ACTIONS, PATH_ANTIGENA, Reason

from .action_store import ActionFile, ActionFileError
from .auth import bearer_token_matches
from .cluster.actions import SharedActions
from .cluster.registry import ClusterUnavailable

if TYPE_CHECKING:
    from .app import VSensor

log = logging.getLogger("ossensor_vsensor.antigena")

ADMIN_TOKEN_VARIABLE = "VSENSOR_ADMIN_TOKEN"
#: Sensors whose registration lists this act on a ``{"type": "filters"}`` message.
FEATURE_FILTER_REFRESH = "filter-refresh"
_FIELDS = {"src", "dst", "sport", "dport", "duration", "start_in", "sensor"}
#: Addresses remembered per sensor as the source of its requests (behind a NAT they differ from
#: what it registers).
_REMOTES_KEPT = 8
_REJECTIONS_KEPT = 50
_SEQUENCES_KEPT = 1000


def _network(name: str, value: Any) -> IPNetwork | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and "%" not in value:
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{name} {value[:64]!r} is not an IP address or CIDR "
                             "(e.g. 192.0.2.7, 198.51.100.0/24, 2001:db8::/32)") from None
    return parse_network(name, value)  # no scope id, no host bits


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {str(value)[:32]}")
    return float(value)


def _port(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a whole number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{name} {port} is out of range (1-65535)")
    return port


def parse_block(message: Any, now: float, known_sensors: Sequence[str]) -> Action:
    """A new action from the operator's JSON; ValueError with a message for the operator."""
    if not isinstance(message, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(message) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    src, dst = _network("src", message.get("src")), _network("dst", message.get("dst"))
    if src is None and dst is None:
        raise ValueError("give a source (src) or a destination (dst) address or CIDR, or both")
    if src is not None and dst is not None and src.version != dst.version:
        raise ValueError(f"src {src} and dst {dst} are not of the same IP version")
    sport, dport = _port("sport", message.get("sport")), _port("dport", message.get("dport"))
    duration = _seconds("duration", message.get("duration"))
    if not duration > 0:
        raise ValueError(f"duration {duration:g} must be greater than 0 seconds")
    if duration > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {duration:g} is longer than {MAX_DURATION_SECONDS} s "
                         "(30 days)")
    start_in = _seconds("start_in", message.get("start_in", 0))
    if not 0 <= start_in <= MAX_DURATION_SECONDS:
        raise ValueError(f"start_in {start_in:g} must be from 0 to {MAX_DURATION_SECONDS} s "
                         "(30 days)")
    sensor = message.get("sensor") or None
    if sensor is not None:
        if not isinstance(sensor, str):
            raise ValueError(f"sensor must be a name, not {sensor!r}")
        if sensor not in known_sensors:
            raise ValueError(f"unknown sensor {sensor!r} (known: "
                             f"{', '.join(sorted(known_sensors)) or 'none yet'})")
    start = now + start_in
    return Action(f"ag-{secrets.token_hex(6)}", src, dst, sport, dport, start,
                  start + duration, sensor)


def refusal(status: int, reason: str, message: str) -> web.Response:
    """An operator request refused: ``{"error": <message>, "reason": <code>}``, logged once."""
    log.warning("refused Antigena action (%s): %s", reason, message[:300])
    return web.json_response({"error": message[:300], "reason": reason}, status=status)


@dataclass
class SensorAntigena:
    """Antigena state of one sensor: its websocket, its reports."""

    connected: bool = False
    connections: int = 0
    reports: int = 0
    last_report: float | None = None
    actions: dict[str, ActionCounts] = field(default_factory=dict)
    rejections: int = 0
    rejected: deque = field(default_factory=lambda: deque(maxlen=_REJECTIONS_KEPT))
    sequences: deque = field(default_factory=lambda: deque(maxlen=_SEQUENCES_KEPT))
    #: What the last report said the sensor enforces, and what waits for its start.
    in_force: list[str] = field(default_factory=list)
    scheduled: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"connected": self.connected, "connections": self.connections,
                "reports": self.reports, "last_report": self.last_report,
                "in_force": list(self.in_force), "scheduled": list(self.scheduled),
                "actions": {k: v.as_json() for k, v in sorted(self.actions.items())},
                "rejections": self.rejections, "rejected": list(self.rejected)}


class AntigenaHub:
    """Actions in force, the sensors' websockets and their reports."""

    def __init__(self, vsensor: VSensor) -> None:
        self.vsensor = vsensor
        #: Actions in force survive a restart (``action_store``): loaded here, saved on change.
        self.file = ActionFile(vsensor.settings.data_dir)
        #: Cluster mode: the actions live in the shared bucket instead (``cluster/actions``,
        #: set up at start, which fills ``actions``).
        self.shared: SharedActions | None = None
        clustered = vsensor.settings.cluster is not None
        self.actions: dict[str, Action] = {} if clustered else {
            a.id: a for a in self.file.load(self.now())}
        if clustered and self.file.path.exists():
            log.warning("cluster mode: %s is not read; the actions in force are those of the "
                        "shared bucket", self.file.path)
        self.sensors: dict[str, SensorAntigena] = {}
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        #: Where sensors reach this vSensor (address, port): the local side of their requests.
        self.endpoints: set[tuple[IPAddress, int]] = set()
        #: Addresses each sensor's requests came from.
        self.remotes: dict[str, set[IPAddress]] = {}

    def now(self) -> float:
        return self.vsensor.now()

    def learn(self, sensor: str, request: web.Request) -> None:
        """Remember where ``sensor`` reached this vSensor from and to (bounded): actions that
        would cut these connections are refused."""
        transport = request.transport
        own = transport.get_extra_info("sockname") if transport is not None else None
        ports = set(self.vsensor.settings.vsensor_ports)
        if own:
            ports.add(int(own[1]))
            address = _address(str(own[0]))
            for port in sorted(ports):
                if address is not None and len(self.endpoints) < MAX_EXEMPT_ENDPOINTS:
                    self.endpoints.add((address, port))
        remote = _address(str(request.remote or ""))
        if remote is not None:
            seen = self.remotes.setdefault(sensor, set())
            if len(seen) < _REMOTES_KEPT:
                seen.add(remote)

    def vsensor_endpoints(self) -> list[tuple[IPAddress, int]]:
        """Every endpoint sensors use: those seen, and the advertised direct address."""
        found = set(self.endpoints)
        direct = self.vsensor.settings.direct
        if direct is not None and _address(direct[0]) is not None:
            found.add((_address(direct[0]), direct[1]))  # type: ignore[arg-type]
        return sorted(found, key=lambda e: (e[0].version, int(e[0]), e[1]))

    def sensor_addresses(self, sensor: str | None) -> list[IPAddress]:
        """What ``sensor`` (None: every sensor) registered as its addresses, and where its
        requests came from."""
        everyone = self.vsensor.registry.everyone()
        names = [sensor] if sensor else sorted(set(everyone) | set(self.remotes))
        found: set[IPAddress] = set()
        for name in names:
            state = everyone.get(name)
            texts: Iterable[str] = state.addresses if state is not None else ()
            found |= {a for a in map(_address, texts) if a is not None}
            found |= self.remotes.get(name, set())
        return sorted(found, key=lambda a: (a.version, int(a)))

    def in_force(self, sensor: str | None = None) -> list[Action]:
        """Actions not yet expired (for ``sensor``: those targeting it or every sensor)."""
        now = self.now()
        gone = [a for a in self.actions.values() if a.expiry <= now]
        for expired in gone:
            del self.actions[expired.id]
            log.info("Antigena action %s (%s) expired", expired.id, expired.describe())
        if gone and self.shared is not None:
            self.shared.forget([a.id for a in gone])
        found = sorted(self.actions.values(), key=lambda a: a.start)
        return [a for a in found if sensor is None or a.sensor in (None, sensor)]

    def status(self) -> dict[str, Any]:
        return {"actions": [a.as_json() for a in self.in_force()],
                "sensors": {name: s.as_json() for name, s in sorted(self.sensors.items())}}

    def _sensor(self, name: str) -> SensorAntigena:
        return self.sensors.setdefault(name, SensorAntigena())

    async def push(self, message: dict[str, Any], sensor: str | None) -> None:
        targets = [ws for name, sockets in self.sockets.items()
                   if sensor is None or name == sensor for ws in sockets]
        for ws in targets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json(message)

    async def filters_changed(self, cause: str) -> None:
        """Tell every other connected sensor that can act on it (feature ``filter-refresh``)
        that its filter changed: it asks for it at once instead of with its next heartbeat."""
        for name, sockets in list(self.sockets.items()):
            state = self.vsensor.sensors.get(name)
            if name == cause or state is None or FEATURE_FILTER_REFRESH not in state.features:
                continue
            for ws in list(sockets):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_json({"type": "filters"})

    # Operator API ------------------------------------------------------------------------

    def _check_admin(self, request: web.Request) -> None:
        token = self.vsensor.settings.admin_token
        if not token:
            raise web.HTTPForbidden(
                text=json.dumps({"error": f"the Antigena operator API is disabled: start the "
                                          f"vSensor with {ADMIN_TOKEN_VARIABLE} set"}),
                content_type="application/json")
        if not bearer_token_matches(request, token):
            log.warning("refused Antigena operator request %s %s from %s: no valid admin token",
                        request.method, request.path, request.remote)
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "admin token required (Authorization: Bearer "
                                          f"<{ADMIN_TOKEN_VARIABLE}>)"}),
                content_type="application/json", headers={"WWW-Authenticate": "Bearer"})

    async def block(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        try:
            message = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        known = set(self.vsensor.registry.everyone()) | set(self.sensors)
        try:
            action = parse_block(message, self.now(), sorted(known))
        except ValueError as exc:
            return refusal(400, Reason.BAD_ACTION, str(exc))
        # Sensors whose addresses are not known yet could be anywhere: any address counts.
        cut = action.cuts(self.vsensor_endpoints(),
                          self.sensor_addresses(action.sensor) or None)
        if cut is not None:
            return refusal(400, Reason.CUTS_VSENSOR,
                           f"block {action.describe()} would cut the sensors' connections to "
                           f"this vSensor at {cut[0]} port {cut[1]}")
        same = next((a for a in self.in_force() if a.match_key() == action.match_key()), None)
        if same is not None:
            # The same block again: one action, kept in force until the later expiry.
            if action.expiry > same.expiry:
                same = Action(same.id, same.src, same.dst, same.sport, same.dport, same.start,
                              action.expiry, same.sensor)
                failed = await self._change({**self.actions, same.id: same})
                if failed is not None:
                    return failed
                await self.push({"type": "action", "action": same.as_json()}, same.sensor)
            return web.json_response({"id": same.id, "duplicate": True,
                                      "action": same.as_json()})
        targets = [action.sensor] if action.sensor else sorted(known) or [None]
        for target in targets:
            count = len(self.in_force(target))
            if count >= MAX_ACTIONS_IN_FORCE:
                return refusal(409, Reason.TOO_MANY_ACTIONS,
                               f"{count} actions are in force for "
                               f"{target or 'every sensor'}: at most {MAX_ACTIONS_IN_FORCE}, "
                               "so that a sensor's watch filter fits the kernel (clear some)")
        failed = await self._change({**self.actions, action.id: action})
        if failed is not None:
            return failed
        log.info("Antigena action %s: block %s for %.0f s on %s", action.id, action.describe(),
                 action.expiry - action.start, action.sensor or "every sensor")
        await self.push({"type": "action", "action": action.as_json()}, action.sensor)
        return web.json_response({"id": action.id, "action": action.as_json()}, status=201)

    async def _change(self, actions: dict[str, Action]) -> web.Response | None:
        """Make ``actions`` the set in force, on disk (or in the shared bucket) first: None
        when done, else the operator's ``503`` (nothing changed)."""
        try:
            if self.shared is not None:
                await self.shared.save(dict(self.actions), actions)
            else:
                self.file.save(sorted(actions.values(), key=lambda a: (a.start, a.id)))
        except (ActionFileError, ClusterUnavailable) as exc:
            log.error("Antigena: %s", exc)
            return web.json_response({"error": f"the change was not made: {exc}",
                                      "reason": Reason.ACTIONS_NOT_SAVED}, status=503,
                                     headers={"Retry-After": "10"})
        self.actions.clear()  # in place: the shared bucket's watch holds the same dict
        self.actions.update(actions)
        return None

    async def list_actions(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        return web.json_response({"actions": [a.as_json() for a in self.in_force()],
                                  "server_time": self.now()})

    async def clear(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        action_id = request.match_info["id"]
        self.in_force()
        action = self.actions.get(action_id)
        if action is None:
            return web.json_response({"error": f"no action {action_id[:100]!r} is in force"},
                                     status=404)
        failed = await self._change({k: a for k, a in self.actions.items()
                                     if k != action_id})
        if failed is not None:
            return failed
        log.info("Antigena action %s cleared", action_id)
        await self.push({"type": "clear", "id": action_id}, action.sensor)
        return web.json_response({"cleared": action_id})

    # The sensors' websocket --------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        verified, _ = await self.vsensor.authenticate(request)
        name = verified.sensor
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
        await ws.prepare(request)
        state = self._sensor(name)
        state.connected, state.connections = True, state.connections + 1
        self.sockets.setdefault(name, set()).add(ws)
        self.learn(name, request)
        log.info("sensor %r opened the Antigena websocket from %s", name, request.remote)
        try:
            await ws.send_json({"type": "sync", "server_time": self.now(),
                                "actions": [a.as_json() for a in self.in_force(name)],
                                "vsensor": [{"host": str(a), "port": p}
                                            for a, p in self.vsensor_endpoints()]})
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                await self._receive(name, state, ws, message.data)
        finally:
            self.sockets[name].discard(ws)
            state.connected = bool(self.sockets[name])
            log.info("sensor %r closed the Antigena websocket", name)
        return ws

    async def _receive(self, name: str, state: SensorAntigena, ws: web.WebSocketResponse,
                       text: str) -> None:
        try:
            message = json.loads(text)
            if not isinstance(message, dict) or message.get("type") != "report":
                raise ValueError("not a report")
            sequence = int(message["seq"])
            actions = message.get("actions") or {}
            rejected = message.get("rejected") or []
            in_force, scheduled = message.get("in_force") or [], message.get("scheduled") or []
            if not isinstance(actions, dict) or not isinstance(rejected, list) or \
                    not isinstance(in_force, list) or not isinstance(scheduled, list):
                raise ValueError("bad report fields")
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # "seq": Infinity
            log.warning("sensor %r sent a malformed Antigena message: %s", name, exc)
            return
        if sequence not in state.sequences and self.shared is not None and \
                0 <= sequence < 1 << 63:  # cluster mode: counted once over the replicas
            try:
                if not await self.shared.first_report(name, sequence):
                    state.sequences.append(sequence)  # counted by another replica
            except ClusterUnavailable as exc:
                log.warning("Antigena report %d of %r not counted yet (NATS: %s); not "
                            "acknowledged, so the sensor sends it again", sequence, name, exc)
                return
        if sequence not in state.sequences:  # a report resent after a lost ack counts once
            state.sequences.append(sequence)
            for action_id, counts in actions.items():
                if isinstance(counts, dict):
                    state.actions.setdefault(str(action_id), ActionCounts()).add(counts)
            for item in rejected:
                if isinstance(item, dict):
                    state.rejections += 1
                    state.rejected.append({"id": str(item.get("id"))[:100],
                                           "reason": str(item.get("reason"))[:300],
                                           "time": self.now()})
            state.reports += 1
            state.last_report = self.now()
            state.in_force = [str(i)[:100] for i in in_force[:MAX_ACTIONS_IN_FORCE * 2]]
            state.scheduled = [str(i)[:100] for i in scheduled[:MAX_ACTIONS_IN_FORCE * 2]]
            if actions or rejected:
                log.info("Antigena report from %r: %s%s", name,
                         ", ".join(f"{k}: {v.get('connections', 0)} connections, "
                                   f"{v.get('resets', 0)} resets"
                                   for k, v in actions.items() if isinstance(v, dict)),
                         f"; {len(rejected)} rejected" if rejected else "")
        await ws.send_json({"type": "ack", "seq": sequence})

    async def close(self, app: web.Application | None = None) -> None:
        for sockets in list(self.sockets.values()):
            for ws in list(sockets):
                await ws.close(code=1001, message=b"vSensor shutting down")


ANTIGENA = web.AppKey("antigena", AntigenaHub)


def setup(app: web.Application, vsensor: VSensor) -> AntigenaHub:
    """Add Antigena's routes to the vSensor application."""
    hub = app[ANTIGENA] = AntigenaHub(vsensor)
    app.router.add_get(PATH_ANTIGENA, hub.websocket)
    app.router.add_post(PATH_ACTIONS, hub.block)
    app.router.add_get(PATH_ACTIONS, hub.list_actions)
    app.router.add_delete(PATH_ACTIONS + "/{id}", hub.clear)
    app.on_shutdown.append(hub.close)
    return hub


def status_rows(hub: AntigenaHub) -> str:
    """HTML for the status page: actions in force, then per sensor and action what it did."""
    def table(head: Sequence[str], rows: list[list[str]]) -> str:
        cells = "".join(f"<th>{h}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in rows)
        return f"<table border=\"1\"><tr>{cells}</tr>{body}</table>"

    when = (lambda t: time.strftime("%H:%M:%S", time.gmtime(t)) if t else "")
    actions = [[a.id, a.describe(), a.sensor or "all", when(a.start), when(a.expiry)]
               for a in hub.in_force()]
    reports = [[name, aid, str(t.connections), str(t.resets), when(t.first_hit),
                when(t.last_hit)]
               for name, s in sorted(hub.sensors.items()) for aid, t in sorted(s.actions.items())]
    sensors = [[name, "yes" if s.connected else "no", str(s.reports), when(s.last_report),
                ", ".join(s.in_force), ", ".join(s.scheduled),
                "; ".join([str(s.rejections), *(f"{r.get('id')}: {r.get('reason')}"
                                                for r in list(s.rejected)[-3:])])]
               for name, s in sorted(hub.sensors.items())]
    return ("<h2>Antigena actions in force</h2>"
            + table(["id", "block", "sensor", "start", "expiry"], actions)
            + "<h2>Antigena sensors</h2>"
            + table(["sensor", "websocket", "reports", "last report", "in force", "scheduled",
                     "rejected (the last reasons)"], sensors)
            + "<h2>Antigena reports</h2>"
            + table(["sensor", "action", "connections", "resets", "first hit", "last hit"],
                    reports))


def _address(text: str) -> IPAddress | None:
    """An IP address without scope id (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
