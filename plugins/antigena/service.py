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
import json
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from ossensor_core.wire.antigena import ActionCounts
from ossensor_core.capture.batch import LINKTYPE_ETHERNET, PacketBatch
from ossensor_core.capture.bpf import attach_filter, compile_filter
from ossensor_core.client import AiohttpTls, signed_headers
from ossensor_core.errors import FilterError
from ossensor_core.runtime.logsetup import level
from ossensor_core.wire.names import PATH_ANTIGENA
from ossensor_core.pipeline.contracts import ResponseEnforcer

from .actions import TCP_RST, Action, first_match, parse_action, parse_ethernet, watch_filter
from .resets import ResetEnforcer

log = logging.getLogger("ossensor_plugins.antigena")

ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
RECV_BYTES = 1 << 18
READ_BURST = 256
CONNECTIONS_REMEMBERED = 10_000


class BlockWatch:
    """One AF_PACKET socket on all interfaces, filtered in the kernel to blocked tuples."""

    def __init__(self, on_frame) -> None:
        self.on_frame = on_frame
        self.sock: socket.socket | None = None
        self.expression = ""

    def set_filter(self, expression: str) -> None:
        """Watch ``expression`` (empty: close the socket). Raises FilterError."""
        if expression == self.expression:
            return
        if not expression:
            self.close()
            return
        program = compile_filter(expression, LINKTYPE_ETHERNET)
        if self.sock is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setblocking(False)
            try:
                attach_filter(sock.fileno(), program)
            except FilterError:
                sock.close()
                raise
            self._drain(sock)  # what arrived before the filter was attached
            self.sock = sock
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        else:
            attach_filter(self.sock.fileno(), program)  # swapped in one step
        self.expression = expression

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(RECV_BYTES)

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(READ_BURST):
            try:
                frame, address = sock.recvfrom(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("Antigena: reading the watch socket failed: %s", exc)
                return
            interface, _, _, hatype = address[:4]
            if hatype == ARPHRD_ETHER:
                self.on_frame(interface, frame)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.expression = ""


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
        self.actions: dict[str, Action] = {}
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
            self.exempt |= {(str(info[4][0]).split("%")[0], self.port) for info in infos}
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

    def _learn_peer(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        peer = ws.get_extra_info("peername")
        if peer:
            before = set(self.exempt)
            self.exempt.add((str(peer[0]).split("%")[0], int(peer[1])))
            if self.exempt != before and self.actions:
                self._rebuild()

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
            kept: dict[str, Action] = {}
            for item in items:
                action = self._parse(item)
                if action is not None:
                    kept[action.id] = action
            gone = set(self.actions) - set(kept)
            self.actions_received += len(set(kept) - set(self.actions))
            self.actions = kept
            log.log(level(3), "Antigena: %d actions in force after sync%s", len(kept),
                    f" ({len(gone)} ended while away)" if gone else "")
        elif kind == "action":
            action = self._parse(message.get("action"))
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
        self._rebuild()
        if kind in ("sync", "action") and self.actions:
            self._probe_idle()

    def _probe_idle(self) -> None:
        """Connections already idle when an action arrives reveal themselves (after the watch
        filter is in place, so that their answer is seen)."""
        actions = list(self.actions.values())
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

    def _parse(self, item: Any) -> Action | None:
        try:
            return parse_action(item, self.now())
        except ValueError as exc:
            self._reject(item.get("id") if isinstance(item, dict) else None, str(exc))
            return None

    def _reject(self, action_id: Any, reason: str) -> None:
        log.warning("Antigena: rejected action %s: %s", action_id, reason)
        self.rejected.append({"id": None if action_id is None else str(action_id)[:100],
                              "reason": reason})

    def _rebuild(self) -> None:
        self._actions_changed.set()
        expression = watch_filter(self.actions.values(), self.exempt)
        try:
            self.watch.set_filter(expression)
        except (FilterError, OSError) as exc:
            log.error("Antigena: cannot watch for blocked traffic (%s): %s", expression, exc)
            return
        log.log(level(3), "Antigena: watch filter is now %r", expression or "(closed)")

    # -- enforcement ------------------------------------------------------------------------

    def _on_frame(self, interface: str, frame: bytes) -> None:
        segment = parse_ethernet(frame)
        if segment is None or segment.flags & TCP_RST:  # our own resets come back here too
            return
        endpoints = segment.endpoints()
        if any(end in self.exempt for end in endpoints):
            return
        now = self.now()
        action = first_match(list(self.actions.values()), segment, now)
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
        """End actions at their expiry: asleep until the soonest one, or until the actions
        change (no wake-ups at all while there is none)."""
        while True:
            now = self.now()
            expired = [a for a in self.actions.values() if a.expiry <= now]
            for action in expired:
                del self.actions[action.id]
                log.log(level(3), "Antigena: action %s expired", action.id)
            if expired:
                self._rebuild()
            self._actions_changed.clear()
            soonest = min((a.expiry for a in self.actions.values()), default=None)
            timeout = None if soonest is None else max(soonest - self.now(), 0.0) + 0.01
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._actions_changed.wait(), timeout)

    # -- reports ----------------------------------------------------------------------------

    def take_report(self) -> dict[str, Any]:
        self.sequence += 1
        report = {"type": "report", "seq": self.sequence, "time": self.now(),
                  "in_force": sorted(self.actions),
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
