"""Registration with the vSensor and the heartbeats that follow it.

Registration sends the body :func:`ossensor_core.client.registration_body` builds (instance id,
addresses, interfaces, the pod CIDRs behind this node, the primary address) and learns the
protocol version, the chunk format, the body digest, the heartbeat period, the vSensor's direct
address and its filter. Heartbeats carry the capture counters, the chunks the spool dropped and
the filter note; they bring the filter back, and register again when our interfaces changed or
the vSensor forgot us (404, 409).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ossensor_core.client import registration_body
from ossensor_core.errors import InterfaceError
from ossensor_core.node.workloads import WorkloadFinder
from ossensor_core.runtime.logsetup import level
from ossensor_core.pipeline.contracts import SensorControl
from ossensor_core.wire.names import (HEARTBEAT_SECONDS_MAX, HEARTBEAT_SECONDS_MIN, PATH_HEARTBEAT,
                                     PATH_REGISTER, PROTOCOL_VERSIONS, SHA256)
from ossensor_core.wire.signing import DIGESTS

from .answers import Backoff, OnceLog, Refused
from .connection import VSensorConnection
from .filters import VSensorFilter

log = logging.getLogger(__package__)  # one logger for the whole transport


class Registration:
    """This sensor's standing with the vSensor: registered or not, and what it agreed."""

    def __init__(self, connection: VSensorConnection, vsensor_filter: VSensorFilter,
                 encoder_versions: tuple[int, ...], report: OnceLog, *,
                 spool_full: Callable[[], tuple[int, int]], spool_dir: Path | None,
                 backoff_min: float, backoff_max: float) -> None:
        self.connection = connection
        self.filter = vsensor_filter
        self.encoder_versions = encoder_versions
        self.report = report
        self.control: SensorControl | None = None  # set when the transport starts
        self.registered = False
        # The chunk format version sent: 1 (every vSensor reads it) until the vSensor lists a
        # higher one that the encoder writes in its registration answer (``chunk_versions``).
        self.chunk_version = 1
        self.heartbeat_seconds = 10.0
        self.workloads: list[str] = []  # pod CIDRs behind this node, sent at registration
        self.primary_address: str | None = None
        self._spool_full = spool_full  # (chunks, packets) the spool limit dropped so far
        self._spool_dir = spool_dir
        self._backoff = (backoff_min, backoff_max)
        self._find_workload_ranges = WorkloadFinder()
        self._registered_body: dict[str, Any] | None = None
        self._reported_drops = (0, 0)
        self._refresh = asyncio.Event()  # the vSensor said its filters changed: heartbeat now

    async def until_done(self) -> None:
        """Register, with back-off until the vSensor answers."""
        backoff = Backoff(*self._backoff)
        while True:
            try:
                await self.register()
                return
            except Refused as answer:
                self.report("register", answer.state, failure_message(
                    answer, "cannot register with", self.connection.base_url, "retrying"))
                await asyncio.sleep(backoff.next(answer.retry_after))

    async def _find_primary_address(self) -> None:
        """The source address this host uses towards the vSensor (a connected UDP socket sends
        nothing); left unset when the name does not resolve or there is no route yet."""
        if self.primary_address is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            family, _, _, _, target = (await loop.getaddrinfo(
                self.connection.host, self.connection.port, type=socket.SOCK_DGRAM))[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(target)
                self.primary_address = str(probe.getsockname()[0]).split("%")[0]
        except (OSError, IndexError, ValueError) as exc:
            log.log(level(1), "primary address not found yet (%s)", exc)

    def body(self) -> dict[str, Any]:
        interfaces = self.control.captured_interfaces() if self.control else []
        return registration_body(self.connection.sensor, self.connection.instance, interfaces,
                                 workloads=self.workloads, primary_address=self.primary_address)

    async def _find_workloads(self) -> None:
        """Pod CIDRs behind this node (``ossensor_core.node.workloads``; netlink, in a thread);
        none when routes cannot be read (the others then keep our traffic too: duplicates)."""
        try:
            self.workloads = await asyncio.to_thread(self._find_workload_ranges)
        except InterfaceError as exc:
            self.report("workloads", "failed", f"{exc}; registering without workload ranges")
            self.workloads = []
        else:
            self.report("workloads", "ok", "workload ranges readable again")

    async def register(self) -> None:
        await self._find_workloads()
        await self._find_primary_address()
        body = self.body()
        connection = self.connection
        answer = await connection.post_json(PATH_REGISTER, body)
        version = answer.get("version")
        if type(version) is not int or version not in PROTOCOL_VERSIONS:  # not True, not 1.0
            raise Refused("version", f"the vSensor picked protocol version {version!r:.40}; this "
                          f"sensor speaks {list(PROTOCOL_VERSIONS)}")
        connection.protocol_version = version
        connection.use_direct(answer.get("direct"))
        digests = answer.get("digests")
        connection.digest = next((d for d in DIGESTS
                                  if isinstance(digests, list) and d in digests), SHA256)
        self.heartbeat_seconds = heartbeat_interval(answer.get("heartbeat_seconds"),
                                                    self.heartbeat_seconds)
        readable = answer.get("chunk_versions")
        self.chunk_version = max((v for v in self.encoder_versions
                                  if isinstance(readable, list) and v in readable), default=1)
        self._registered_body = body
        self.registered = True
        self.report("register", "ok", None)
        log.info("registered with the vSensor at %s (protocol %d, chunk format %d, %d addresses, "
                 "%d interfaces)", connection.base_url, version, self.chunk_version,
                 len(body["addresses"]), len(body["interfaces"]))
        self.filter.apply(answer.get("filter"), answer.get("peer_ranges"))

    def refresh(self) -> None:
        """Send the next heartbeat (which brings the vSensor's filter) now."""
        self._refresh.set()

    async def heartbeats(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), self.heartbeat_seconds)
            self._refresh.clear()
            try:
                await self.heartbeat_once()
            except Exception:  # a bug must not end heartbeats (and filter updates) for good
                log.exception("heartbeat failed")

    def heartbeat_body(self) -> dict[str, Any]:
        stats = self.control.capture_stats() if self.control else {}
        chunks, packets = self._spool_full()
        body: dict[str, Any] = {
            "interfaces": {name: {"packets": s.packets, "drops": s.drops}
                           for name, s in stats.items()},
            "dropped": {"chunks": chunks, "packets": packets}}
        note = "; ".join(n for n in (self.control.filter_note() if self.control else "",
                                     self.filter.refused) if n)
        if note:  # e.g. the peer exclusion did not fit: shown on the vSensor's page
            body["filter_note"] = note
        if self.filter.peers_id is not None:
            body["peer_ranges_id"] = self.filter.peers_id
        return body

    async def heartbeat_once(self) -> None:
        """One heartbeat (or a new registration when our interfaces changed)."""
        await self._find_workloads()
        if self.body() != self._registered_body:
            # Interfaces or addresses changed: the vSensor's filters for the peers need them.
            with contextlib.suppress(Refused):
                await self.register()
            return
        body = self.heartbeat_body()
        dropped = self._spool_full()
        if dropped != self._reported_drops:
            self._reported_drops = dropped
            log.warning("%d chunks (%d packets) dropped so far because the spool %s was full; "
                        "reporting it to the vSensor", *dropped, self._spool_dir)
        base = self.connection.base_url
        try:
            answer = await self.connection.post_json(PATH_HEARTBEAT, body)
        except Refused as failure:
            self.report("heartbeat", failure.state, f"heartbeat to the vSensor at {base} "
                        f"failed: {failure}")
            if self.connection.direct_failed(failure):
                with contextlib.suppress(Refused):
                    await self.register()
                return
            if failure.status in (404, 409):  # the vSensor no longer knows us
                with contextlib.suppress(Refused):
                    await self.register()
            return
        self.report("heartbeat", "ok", f"heartbeats to {base} work again")
        self.filter.apply(answer.get("filter"), answer.get("peer_ranges"))

    async def say_goodbye(self) -> None:
        """Tell the vSensor this instance stops, so that the next one (a replaced pod) may use
        the name at once instead of after three heartbeats; best effort, two seconds."""
        try:
            await asyncio.wait_for(self.connection.post_json(
                PATH_HEARTBEAT, {**self.heartbeat_body(), "leaving": True}), 2.0)
        except (Refused, TimeoutError) as exc:
            log.log(level(1), "could not tell the vSensor that this sensor stops: %s", exc)


def failure_message(answer: Refused, what: str, base_url: str, then: str) -> str:
    """A failed request, for the log; a 401 says that the key or the clock is wrong."""
    if answer.status == 401:
        return f"vSensor rejected the key or the clock ({what} {base_url}): {answer}; {then}"
    return f"{what} the vSensor at {base_url}: {answer}; {then}"


def heartbeat_interval(value: Any, current: float) -> float:
    """The vSensor's ``heartbeat_seconds`` within [``HEARTBEAT_SECONDS_MIN``,
    ``HEARTBEAT_SECONDS_MAX``] (a hostile 0 is no tight loop, a huge one no silence); ``current``
    when it is not a finite number (a bool, a string, NaN, infinity)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        if value is not None:
            log.warning("the vSensor's heartbeat_seconds %.40r is not a finite number; keeping "
                        "%g s", value, current)
        return current
    bounded = min(max(float(value), HEARTBEAT_SECONDS_MIN), HEARTBEAT_SECONDS_MAX)
    if bounded != value:
        log.warning("the vSensor's heartbeat_seconds %g is outside [%g, %g]; using %g s",
                    value, HEARTBEAT_SECONDS_MIN, HEARTBEAT_SECONDS_MAX, bounded)
    return bounded
