"""The Antigena client: a websocket to the vSensor, a socket that sees only blocked traffic, the
enforcers, and the periodic reports.

The watching socket is separate from the capture: an AF_PACKET socket on every interface whose
kernel filter matches only the connections that actions block (plus nothing at all while no
action is in force: the socket is then closed), rebuilt whenever the set of actions changes. The
capture path is not touched, and traffic that no action blocks never reaches this code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from ossensor_core.wire.antigena import (MAX_ACTIONS_IN_FORCE, MAX_EXEMPT_ENDPOINTS,
                                         ActionCounts)
from ossensor_core.capture.batch import LINKTYPE_ETHERNET, PacketBatch
from ossensor_core.capture.bpf import compile_filter
from ossensor_core.client import AiohttpTls, signed_headers
from ossensor_core.errors import FilterError
from ossensor_core.runtime.logsetup import level
from ossensor_core.wire.names import PATH_ANTIGENA
from ossensor_core.pipeline.contracts import ResponseEnforcer

from .actions import TCP_RST, Action, first_match, parse_action, parse_ethernet, watch_filter
from .resets import ResetEnforcer
from .watch import BlockWatch

log = logging.getLogger("ossensor_plugins.antigena")

CONNECTIONS_REMEMBERED = 10_000
#: Rejections kept per report (a hostile vSensor could send endless bad actions).
REJECTIONS_PER_REPORT = 500
#: An action is watched from this long before its start: the sensor's view of the vSensor's
#: clock (corrected by ``server_time``) is off by about a one-way delay, and an action issued
#: "now" must be watched at once, not a few milliseconds later.
START_SLACK_SECONDS = 1.0


class Antigena:
    """Holds the websocket, keeps the actions in force, enforces them and reports."""

    def __init__(self, *, host: str, port: int, key: str, sensor: str,
                 tls: AiohttpTls, period: float,
                 enforcers: Sequence[ResponseEnforcer], reconnect_max: float = 10.0,
                 reports_kept: int = 1000,
                 on_filters_changed: Callable[[], None] | None = None) -> None:
        self.host, self.port, self.sensor = host, port, sensor
        self._key = key
        self.tls = tls
        self.period = period
        self.enforcers = list(enforcers)
        self.reconnect_max = reconnect_max
        self.url = f"wss://{f'[{host}]' if ':' in host else host}:{port}{PATH_ANTIGENA}"
        #: Accepted actions, in force or waiting for their start.
        self.actions: dict[str, Action] = {}
        #: The ids of the actions the watch filter in place matches: the only ones reported in
        #: force (an action not in it is waiting for its start, or rejected).
        self.enforced: frozenset[str] = frozenset()
        #: The sensor's own side of its websocket (its address towards the vSensor).
        self.local: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._rebuilding = asyncio.Lock()
        self.counts: dict[str, ActionCounts] = {}
        self.rejected: list[dict[str, Any]] = []
        self.actions_received = 0  # action messages taken, and new actions in syncs (metrics)
        self.pending: deque[dict[str, Any]] = deque(maxlen=reports_kept)
        self.sequence = time.time_ns()
        self.clock_offset = 0.0
        self.exempt: set[tuple[str, int]] = set()
        self.seen: dict[str, set[tuple]] = {}
        self.watch = BlockWatch(self._on_frame)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connected = asyncio.Event()
        self._actions_changed = asyncio.Event()  # wakes the expiry task
        # The vSensor says the set of sensors changed: the transport fetches the new filter.
        self.on_filters_changed = on_filters_changed

    def __repr__(self) -> str:  # never the key
        return f"Antigena({self.url!r}, sensor={self.sensor!r})"

    def now(self) -> float:
        """The vSensor's clock (actions' expiry times are in it)."""
        return time.time() + self.clock_offset

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self._resolve_vsensor()
        # Enforcers load what they need (scapy: 0.3 s, more on a busy node) now, in the
        # background, so that the first action is enforced at once.
        tasks = [asyncio.create_task(coro, name=name) for coro, name in
                 ((self._prepare_enforcers(), "antigena enforcers"),
                  (self._connect_forever(), "antigena websocket"),
                  (self._report_forever(), "antigena reports"),
                  (self._expire_forever(), "antigena expiry"))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.watch.close()
            for enforcer in self.enforcers:
                enforcer.close()

    async def _resolve_vsensor(self) -> None:
        """The vSensor's addresses: its traffic is never blocked."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port,
                                                                 type=socket.SOCK_STREAM)
            for info in infos:
                self._exempt(str(info[4][0]), self.port)
        except OSError as exc:
            log.warning("Antigena: cannot resolve the vSensor %s yet: %s", self.host, exc)

    async def _connect_forever(self) -> None:
        delay = 0.5
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls)) as session:
            while True:
                try:
                    headers = signed_headers(self._key, self.sensor, "GET", PATH_ANTIGENA, b"",
                                             version=1)
                    async with session.ws_connect(self.url, headers=headers, heartbeat=20.0,
                                                  timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                                  max_msg_size=4 << 20) as ws:
                        delay = 0.5
                        self._learn_peer(ws)
                        await self._rebuild()
                        log.info("Antigena: connected to the vSensor at %s", self.url)
                        self.ws = ws
                        self.connected.set()
                        await self._send_pending()
                        async for message in ws:
                            if message.type == aiohttp.WSMsgType.TEXT:
                                await self._on_message(message.data)
                            elif message.type == aiohttp.WSMsgType.ERROR:
                                break
                    log.warning("Antigena: the vSensor closed the websocket; reconnecting")
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.warning("Antigena: no websocket to the vSensor at %s (%s); retrying in "
                                "%.1f s", self.url, _reason(exc), delay)
                finally:
                    self.ws = None
                    self.connected.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)

    def _exempt(self, host: str, port: int) -> bool:
        """Keep ``host:port`` (a vSensor endpoint) out of the watch; True when it is new. At most
        :data:`MAX_EXEMPT_ENDPOINTS` (the filter must fit the kernel); never a scope id."""
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        endpoint = (str(address), int(port))
        if endpoint in self.exempt or not 0 < endpoint[1] < 65536:
            return False
        if len(self.exempt) >= MAX_EXEMPT_ENDPOINTS:
            log.warning("Antigena: more than %d vSensor endpoints; %s:%d is not kept out of "
                        "the watch", MAX_EXEMPT_ENDPOINTS, *endpoint)
            return False
        self.exempt.add(endpoint)
        return True

    def _learn_peer(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        peer, own = ws.get_extra_info("peername"), ws.get_extra_info("sockname")
        if own:
            with contextlib.suppress(ValueError):
                local = ipaddress.ip_address(str(own[0]).split("%")[0])
                self.local = {local.ipv4_mapped or local if local.version == 6 else local}
        if peer:
            self._exempt(str(peer[0]), int(peer[1]))

    # -- messages from the vSensor ----------------------------------------------------------

    async def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message.get("type") if isinstance(message, dict) else None
        except ValueError:
            self._reject(None, "a message from the vSensor is not JSON")
            return
        if kind == "filters":
            log.log(level(3), "Antigena: the vSensor's filters changed; asking for ours now")
            if self.on_filters_changed is not None:
                self.on_filters_changed()
            return
        if kind == "ack":
            sequence = message.get("seq")
            for report in list(self.pending):
                if report["seq"] == sequence:
                    self.pending.remove(report)
            return
        if kind == "sync":
            server_time = message.get("server_time")
            if isinstance(server_time, (int, float)):
                self.clock_offset = server_time - time.time()
            items = message.get("actions")
            if not isinstance(items, list):
                self._reject(None, "sync without a list of actions")
                return
            self._learn_endpoints(message.get("vsensor"))
            kept: dict[str, Action] = {}
            for item in items[:10 * MAX_ACTIONS_IN_FORCE]:
                action = self._parse(item, kept)
                if action is not None:
                    kept[action.id] = action
            gone = set(self.actions) - set(kept)
            self.actions_received += len(set(kept) - set(self.actions))
            self.actions = kept
            log.log(level(3), "Antigena: %d actions in force after sync%s", len(kept),
                    f" ({len(gone)} ended while away)" if gone else "")
        elif kind == "action":
            action = self._parse(message.get("action"), self.actions)
            if action is None:
                return
            again = action.id in self.actions
            self.actions[action.id] = action
            self.actions_received += 1
            log.log(level(3), "Antigena: action %s %s: block %s until %s", action.id,
                    "updated" if again else "received", action.describe(),
                    time.strftime("%H:%M:%S", time.gmtime(action.expiry)))
        elif kind == "clear":
            action_id = message.get("id")
            if self.actions.pop(action_id, None) is None:
                log.log(level(3), "Antigena: clear of unknown action %r ignored", action_id)
                return
            log.log(level(3), "Antigena: action %s cleared", action_id)
        else:
            self._reject(message.get("id") if isinstance(message, dict) else None,
                         f"unknown message type {kind!r}")
            return
        if self.actions:
            await self._prepare_enforcers()
        await self._rebuild()

    def _learn_endpoints(self, endpoints: Any) -> None:
        """The vSensor's own list of the endpoints its sensors use (``sync``): its direct
        address behind a load balancer, say. They are only ever kept out of the watch."""
        if not isinstance(endpoints, list):
            return
        for item in endpoints[:MAX_EXEMPT_ENDPOINTS]:
            if isinstance(item, dict) and isinstance(item.get("host"), str) \
                    and isinstance(item.get("port"), int) and not isinstance(item["port"], bool):
                self._exempt(item["host"], item["port"])

    def _probe_idle(self) -> None:
        """Connections already idle when an action arrives reveal themselves (after the watch
        filter is in place, so that their answer is seen)."""
        actions = [self.actions[i] for i in self.enforced if i in self.actions]
        for enforcer in self.enforcers:
            if isinstance(enforcer, ResetEnforcer):
                try:
                    enforcer.probe_idle(actions, self.exempt)
                except Exception:
                    log.exception("Antigena: probing idle connections failed")

    async def _prepare_enforcers(self) -> None:
        """Let enforcers load what they need (a library, a table) off the event loop; idempotent."""
        for enforcer in self.enforcers:
            try:
                await asyncio.to_thread(enforcer.prepare)
            except Exception:
                log.exception("Antigena: enforcer %s cannot prepare", enforcer.name)

    def _parse(self, item: Any, accepted: dict[str, Action]) -> Action | None:
        """An action to add to ``accepted``, or None (rejected and reported): malformed, one
        that would cut this sensor's own connection to the vSensor, or one beyond the cap."""
        try:
            action = parse_action(item, self.now())
            endpoints = [(ipaddress.ip_address(h), p) for h, p in sorted(self.exempt)]
            cut = action.cuts(endpoints, self.local)
            if cut is not None:
                raise ValueError(f"it would cut this sensor's connection to the vSensor at "
                                 f"{cut[0]} port {cut[1]}")
            if action.id not in accepted and len(accepted) >= MAX_ACTIONS_IN_FORCE:
                raise ValueError(f"{MAX_ACTIONS_IN_FORCE} actions are in force already (the "
                                 "most a watch filter holds within the kernel's limit)")
            return action
        except ValueError as exc:
            self._reject(item.get("id") if isinstance(item, dict) else None, str(exc))
            return None

    def _reject(self, action_id: Any, reason: str) -> None:
        log.warning("Antigena: rejected action %s: %s", action_id, reason)
        if len(self.rejected) >= REJECTIONS_PER_REPORT:
            return
        self.rejected.append({"id": None if action_id is None else str(action_id)[:100],
                              "reason": reason})

    async def _rebuild(self) -> None:
        """Watch for the actions due now (started, not expired). The filter compiles in a
        thread (hundreds of terms take seconds); one rebuild at a time, each from the actions
        as they are when it starts. When the set cannot be watched, the actions new to it are
        rejected (reported with the reason) and the rest watched: an action is reported in
        force only while the filter in place matches it."""
        self._actions_changed.set()
        async with self._rebuilding:
            now = self.now()
            due = {a.id: a for a in self.actions.values()
                   if a.start - START_SLACK_SECONDS <= now < a.expiry}
            attempts, error = [due], ""
            if set(due) - self.enforced:
                attempts.append({i: a for i, a in due.items() if i in self.enforced})
            for attempt in attempts:
                expression = watch_filter(attempt.values(), self.exempt)
                try:
                    program = (await asyncio.to_thread(compile_filter, expression,
                                                       LINKTYPE_ETHERNET)
                               if expression else None)
                    self.watch.set_program(program)
                except (FilterError, OSError) as exc:
                    error = str(exc)[:200]
                    log.error("Antigena: cannot watch for blocked traffic (%s): %s",
                              expression[:200], error)
                    continue
                for action_id in sorted(set(due) - set(attempt)):
                    self.actions.pop(action_id, None)
                    self._reject(action_id, f"cannot be enforced: the watch filter does not "
                                            f"take it ({error})")
                started = set(attempt) - self.enforced
                self.enforced = frozenset(attempt)
                log.log(level(3), "Antigena: watch filter is now %r", expression or "(closed)")
                if started:
                    self._probe_idle()
                return
            for action_id in sorted(due):  # not even the previous set can be watched now
                self.actions.pop(action_id, None)
                self._reject(action_id, f"cannot be enforced: {error}")
            self.watch.close()
            self.enforced = frozenset()

    # -- enforcement ------------------------------------------------------------------------

    def _on_frame(self, interface: str, frame: bytes) -> None:
        segment = parse_ethernet(frame)
        if segment is None or segment.flags & TCP_RST:  # our own resets come back here too
            return
        endpoints = segment.endpoints()
        if any(end in self.exempt for end in endpoints):
            return
        now = self.now()
        # Only what the watch filter in place matches: started, not rejected.
        action = first_match([a for i, a in self.actions.items() if i in self.enforced],
                             segment, now)
        if action is None:
            return
        counts = self.counts.setdefault(action.id, ActionCounts())
        counts.segments += 1
        counts.first_hit = counts.first_hit or time.time()
        counts.last_hit = time.time()
        seen = self.seen.setdefault(action.id, set())
        if segment.connection() not in seen:
            if len(seen) < CONNECTIONS_REMEMBERED:
                seen.add(segment.connection())
            counts.connections += 1
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            ifindex = 0
        batch = PacketBatch.from_frames(interface, ifindex, LINKTYPE_ETHERNET,
                                        [(time.time_ns(), len(frame), frame)])
        for enforcer in self.enforcers:
            try:
                acted = enforcer.enforce(batch, [action])
            except Exception:  # one broken enforcer must not stop the others
                log.exception("Antigena: enforcer %s failed", enforcer.name)
                continue
            name = str(enforcer.name)
            counts.enforcers[name] = counts.enforcers.get(name, 0) + int(acted or 0)
            if isinstance(enforcer, ResetEnforcer):
                counts.resets += enforcer.resets.pop(action.id, 0)

    async def _expire_forever(self) -> None:
        """Start actions at their start and end them at their expiry: asleep until the soonest
        of these, or until the actions change (no wake-ups at all while there is none)."""
        while True:
            now = self.now()
            expired = [a for a in self.actions.values() if a.expiry <= now]
            for action in expired:
                del self.actions[action.id]
                log.log(level(3), "Antigena: action %s expired", action.id)
            started = [a for a in self.actions.values()
                       if a.start - START_SLACK_SECONDS <= now and a.id not in self.enforced]
            if expired or started:
                await self._rebuild()
            self._actions_changed.clear()
            soonest = min((t for a in self.actions.values()
                           for t in ((a.expiry,) if a.id in self.enforced
                                     else (a.start - START_SLACK_SECONDS, a.expiry))),
                          default=None)
            timeout = None if soonest is None else max(soonest - self.now(), 0.0) + 0.01
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._actions_changed.wait(), timeout)

    # -- reports ----------------------------------------------------------------------------

    def take_report(self) -> dict[str, Any]:
        self.sequence += 1
        now = self.now()
        report = {"type": "report", "seq": self.sequence, "time": now,
                  "in_force": sorted(i for i in self.enforced if i in self.actions),
                  "scheduled": sorted(i for i, a in self.actions.items()
                                      if i not in self.enforced and a.expiry > now),
                  "actions": {k: v.as_json() for k, v in self.counts.items()},
                  "rejected": self.rejected}
        segments = sum(c.segments for c in self.counts.values())
        resets = sum(c.resets for c in self.counts.values())
        log.log(level(1), "Antigena: %d actions in force; since the last report %d connections "
                "hit, %d segments, %d resets, %d rejected%s", len(self.actions),
                sum(c.connections for c in self.counts.values()), segments, resets,
                len(self.rejected), "" if self.ws is not None else
                f"; vSensor away, {len(self.pending) + 1} reports kept")
        self.counts, self.rejected = {}, []
        for action_id in [a for a in self.seen if a not in self.actions]:
            del self.seen[action_id]
        return report

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            if len(self.pending) == self.pending.maxlen:
                log.warning("Antigena: the vSensor has been away long; the oldest report is "
                            "dropped")
            self.pending.append(self.take_report())
            await self._send_pending()

    async def _send_pending(self) -> None:
        ws = self.ws
        if ws is None:
            return
        for report in list(self.pending):  # removed when the vSensor acknowledges them
            try:
                await ws.send_str(json.dumps(report))
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                log.warning("Antigena: sending a report failed (%s); kept for later", exc)
                return
            log.log(level(2), "Antigena: report %d sent", report["seq"])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the vSensor answered {exc.status} {exc.message}"
    return str(exc) or type(exc).__name__
