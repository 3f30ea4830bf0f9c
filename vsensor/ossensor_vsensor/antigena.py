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

import argparse
import contextlib
import html
import ipaddress
import json
import logging
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from ossensor_core.wire.antigena import ActionCounts, IPNetwork
from ossensor_core.wire.antigena import BlockAction as Action
from ossensor_core.wire.names import PATH_ACTIONS, PATH_ANTIGENA

from .auth import bearer_token_matches

if TYPE_CHECKING:
    from .app import VSensor

log = logging.getLogger("ossensor_vsensor.antigena")

MAX_DURATION_SECONDS = 30 * 86400
ADMIN_TOKEN_VARIABLE = "VSENSOR_ADMIN_TOKEN"
#: Sensors whose registration lists this act on a ``{"type": "filters"}`` message.
FEATURE_FILTER_REFRESH = "filter-refresh"
_FIELDS = {"src", "dst", "sport", "dport", "duration", "sensor"}
_REJECTIONS_KEPT = 50
_SEQUENCES_KEPT = 1000


def _network(name: str, value: Any) -> IPNetwork | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be an IP address or CIDR as a string, not {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not an IP address or CIDR "
                         "(e.g. 192.0.2.7, 198.51.100.0/24, 2001:db8::/32)") from None


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
    duration = message.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise ValueError(f"duration must be a number of seconds, not {duration!r}")
    if not duration > 0:
        raise ValueError(f"duration {duration:g} must be greater than 0 seconds")
    if duration > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {duration:g} is longer than {MAX_DURATION_SECONDS} s "
                         "(30 days)")
    sensor = message.get("sensor") or None
    if sensor is not None:
        if not isinstance(sensor, str):
            raise ValueError(f"sensor must be a name, not {sensor!r}")
        if sensor not in known_sensors:
            raise ValueError(f"unknown sensor {sensor!r} (known: "
                             f"{', '.join(sorted(known_sensors)) or 'none yet'})")
    return Action(f"ag-{secrets.token_hex(6)}", src, dst, sport, dport, now, now + duration,
                  sensor)


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

    def as_json(self) -> dict[str, Any]:
        return {"connected": self.connected, "connections": self.connections,
                "reports": self.reports, "last_report": self.last_report,
                "actions": {k: v.as_json() for k, v in sorted(self.actions.items())},
                "rejections": self.rejections, "rejected": list(self.rejected)}


class AntigenaHub:
    """Actions in force, the sensors' websockets and their reports."""

    def __init__(self, vsensor: VSensor) -> None:
        self.vsensor = vsensor
        self.actions: dict[str, Action] = {}
        self.sensors: dict[str, SensorAntigena] = {}
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}

    def now(self) -> float:
        return self.vsensor.now()

    def in_force(self, sensor: str | None = None) -> list[Action]:
        """Actions not yet expired (for ``sensor``: those targeting it or every sensor)."""
        now = self.now()
        for expired in [a for a in self.actions.values() if a.expiry <= now]:
            del self.actions[expired.id]
            log.info("Antigena action %s (%s) expired", expired.id, expired.describe())
        found = sorted(self.actions.values(), key=lambda a: a.start)
        return [a for a in found if sensor is None or a.sensor in (None, sensor)]

    def status(self) -> dict[str, Any]:
        return {"actions": [a.as_json() for a in self.in_force()],
                "sensors": {name: s.as_json() for name, s in sorted(self.sensors.items())}}

    def _sensor(self, name: str) -> SensorAntigena:
        return self.sensors.setdefault(name, SensorAntigena())

    async def _push(self, message: dict[str, Any], sensor: str | None) -> None:
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
        known = set(self.vsensor.sensors) | set(self.sensors)
        try:
            action = parse_block(message, self.now(), sorted(known))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        same = next((a for a in self.in_force() if a.match_key() == action.match_key()), None)
        if same is not None:
            # The same block again: one action, kept in force until the later expiry.
            if action.expiry > same.expiry:
                same = Action(same.id, same.src, same.dst, same.sport, same.dport, same.start,
                              action.expiry, same.sensor)
                self.actions[same.id] = same
                await self._push({"type": "action", "action": same.as_json()}, same.sensor)
            return web.json_response({"id": same.id, "duplicate": True,
                                      "action": same.as_json()})
        self.actions[action.id] = action
        log.info("Antigena action %s: block %s for %.0f s on %s", action.id, action.describe(),
                 action.expiry - action.start, action.sensor or "every sensor")
        await self._push({"type": "action", "action": action.as_json()}, action.sensor)
        return web.json_response({"id": action.id, "action": action.as_json()}, status=201)

    async def list_actions(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        return web.json_response({"actions": [a.as_json() for a in self.in_force()],
                                  "server_time": self.now()})

    async def clear(self, request: web.Request) -> web.Response:
        self._check_admin(request)
        action_id = request.match_info["id"]
        self.in_force()
        action = self.actions.pop(action_id, None)
        if action is None:
            return web.json_response({"error": f"no action {action_id!r} is in force"},
                                     status=404)
        log.info("Antigena action %s cleared", action_id)
        await self._push({"type": "clear", "id": action_id}, action.sensor)
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
        log.info("sensor %r opened the Antigena websocket from %s", name, request.remote)
        try:
            await ws.send_json({"type": "sync", "server_time": self.now(),
                                "actions": [a.as_json() for a in self.in_force(name)]})
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
            if not isinstance(actions, dict) or not isinstance(rejected, list):
                raise ValueError("bad report fields")
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # "seq": Infinity
            log.warning("sensor %r sent a malformed Antigena message: %s", name, exc)
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
                str(s.rejections)] for name, s in sorted(hub.sensors.items())]
    return ("<h2>Antigena actions in force</h2>"
            + table(["id", "block", "sensor", "start", "expiry"], actions)
            + "<h2>Antigena sensors</h2>"
            + table(["sensor", "websocket", "reports", "last report", "rejected"], sensors)
            + "<h2>Antigena reports</h2>"
            + table(["sensor", "action", "connections", "resets", "first hit", "last hit"],
                    reports))


# The operator CLI: ``ossensor-vsensor antigena --url https://HOST:PORT ...`` ------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ossensor-vsensor antigena",
                     description="Issue, list and clear Antigena actions on a running vSensor.",
                     epilog=f"The admin token is read from ${ADMIN_TOKEN_VARIABLE}.")
    parser.add_argument("--url", required=True, metavar="https://HOST:PORT",
                        help="the running vSensor")
    parser.add_argument("--ca-file", metavar="FILE",
                        help="CA bundle (PEM) that verifies the vSensor's certificate")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    block = commands.add_parser("block", help="block matching TCP connections; prints the id")
    block.add_argument("--src", metavar="ADDR", help="source address or CIDR")
    block.add_argument("--dst", metavar="ADDR", help="destination address or CIDR")
    block.add_argument("--sport", metavar="PORT", help="source port (for a full 5-tuple)")
    block.add_argument("--dport", metavar="PORT", help="destination port")
    block.add_argument("--duration", required=True, type=float, metavar="SECONDS",
                       help="how long the action holds")
    block.add_argument("--sensor", metavar="NAME", help="only this sensor enforces it")
    listing = commands.add_parser("list", help="the actions in force")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    clear = commands.add_parser("clear", help="end an action now")
    clear.add_argument("id", help="the action's id")
    return parser


class OperatorError(Exception):
    """A refused or failed operator request; the message is for the operator."""


def _request(url: str, method: str, token: str, context: ssl.SSLContext,
             body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=15) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise OperatorError(f"the vSensor refused ({exc.code}): {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # URLError wraps what urlopen met on connecting; an SSLError while reading names it too.
        reason = exc.reason if isinstance(exc, (urllib.error.URLError, ssl.SSLError)) else exc
        raise OperatorError(f"cannot reach the vSensor at {url}: {reason}") from None


def run_cli(argv: Sequence[str], environ: dict[str, str]) -> int:
    """``ossensor-vsensor antigena ...``: exit 0 on success, 1 with a message otherwise."""
    args = build_parser().parse_args(list(argv))
    token = environ.get(ADMIN_TOKEN_VARIABLE, "")
    try:
        if not token:
            raise OperatorError(f"set {ADMIN_TOKEN_VARIABLE} to the vSensor's admin token")
        if not args.url.startswith("https://"):
            raise OperatorError(f"--url {args.url!r}: expected https://HOST:PORT")
        try:
            context = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise OperatorError(f"--ca-file {args.ca_file!r}: cannot load it "
                                f"({exc.strerror or exc})") from None
        base = args.url.rstrip("/") + PATH_ACTIONS
        if args.command == "block":
            body = {k: v for k, v in (("src", args.src), ("dst", args.dst),
                                      ("sport", args.sport), ("dport", args.dport),
                                      ("sensor", args.sensor)) if v is not None}
            body["duration"] = args.duration
            answer = _request(base, "POST", token, context, body)
            print(answer["id"])
        elif args.command == "list":
            actions = _request(base, "GET", token, context)["actions"]
            if args.json:
                json.dump(actions, sys.stdout, indent=2)
                print()
            else:
                print(_table(actions))
        else:
            answer = _request(f"{base}/{urllib.request.quote(args.id, safe='')}", "DELETE",
                              token, context)
            print(f"cleared {answer['cleared']}")
    except OperatorError as exc:
        print(f"ossensor-vsensor antigena: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _table(actions: list[dict[str, Any]]) -> str:
    head = ("ID", "SRC", "DST", "SPORT", "DPORT", "SENSOR", "EXPIRES IN")
    now = time.time()
    rows = [(a["id"], a["src"] or "*", a["dst"] or "*", str(a["sport"] or "*"),
             str(a["dport"] or "*"), a["sensor"] or "*", f"{max(a['expiry'] - now, 0):.0f} s")
            for a in actions]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in (head, *rows))
