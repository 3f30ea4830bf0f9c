"""Running the sensor: captures feed filters, batches are cut into chunks, chunks go out.

One asyncio loop drives everything. Each capture source has a task that waits until its
descriptor is readable, takes the ready batches and hands them to the :class:`Chunker`
(``chunker.py``), which runs the user-space filters on each batch and adds it to the pending
chunk. A chunk is cut when it reaches ``OSSENSOR_CHUNK_BYTES`` or ``OSSENSOR_CHUNK_SECONDS``
after its first batch, and a single sender task hands chunks to the transport in order. Work is
per batch or per chunk, never per packet.

What health and metrics read of a running sensor is :meth:`Sensor.stats` (a
:class:`SensorStats`), :meth:`Sensor.capture_stats` and :meth:`Transport.stats`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.bounded import fit_bounded
from ossensor_core.capture.bpf import BpfProgram, combine_filters
from ossensor_core.capture.peer_exclusion import AddressSet, fit_exclusion
from ossensor_core.errors import CaptureError, FilterError, InterfaceError, OssensorError, PluginError, TransportError
from ossensor_core.node.interfaces import Interface, InterfaceEvent, InterfaceWatch
from ossensor_core.runtime.logsetup import level
from ossensor_core.pipeline.chunker import Chunker
from ossensor_core.pipeline.contracts import (CaptureBackend, CaptureSource, CaptureStats, Chunk,
                                              InterfaceCounters, PacketFilter, Transport)
from ossensor_core.pipeline.single_copy import SingleCopy
from ossensor_core.pipeline.startup import Prepared
from ossensor_core.runtime.threads import named_executor

log = logging.getLogger("ossensor.sensor")

SHUTDOWN_GRACE_SECONDS = 4.0
# Chunks cut and waiting for the transport (which keeps its own bounded queue). Two: the ring
# is the buffer for bursts; four raised the peak RSS at full rate by about 5 MiB (make bench,
# 512-byte UDP unpaced: 92-97 MiB outside the ring with four, 86-91 with two).
_QUEUE_CHUNKS = 2
# Counters of interfaces that went away, kept for /metrics and the stats line. Pods' veths come
# and go for months under new names: only the latest are kept (make soak: every one ever seen
# was reported every stats period, and kept, before).
_CLOSED_KEPT = 32


@dataclass
class _Capture:
    source: CaptureSource
    task: asyncio.Task[None]
    #: The single-copy rule in its filter now ("": every copy is kept).
    placement: str = ""



@dataclass(frozen=True)
class SensorStats:
    """What the running sensor reports of itself (health and metrics read this, never the
    sensor's attributes)."""

    #: Chunks, and packets in them, that the transport accepted.
    chunks_sent: int
    packets_sent: int
    #: Chunks cut and waiting for the transport to take them.
    chunks_waiting: int
    #: The interfaces captured now, in the order their captures opened.
    interfaces: tuple[str, ...]
    #: The kernel filter in force (``(vSensor filter) and (plugin filters and BPF)``), and a
    #: short digest of it with the peer exclusion: it changes exactly when the filter does.
    kernel_filter: str
    filter_version: str
    #: Interfaces the single-copy rules cannot place (their packets may be stored twice).
    unplaced: tuple[str, ...] = ()


class Sensor:
    """The assembled pipeline of one sensor process."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.config = prepared.config
        hook = prepared.plugins.hook
        backend = hook.ossensor_capture_backend(config=self.config)
        if backend is None:
            raise PluginError(f"capture plugin {self.config.capture_backend!r} returned no backend")
        self.backend: CaptureBackend = backend
        self.filters: list[PacketFilter] = [
            # pluggy calls the last registered first: reversed, they run in OSSENSOR_PLUGINS order
            f for f in reversed(hook.ossensor_packet_filter(config=self.config)) if f is not None]
        encoder = hook.ossensor_chunk_encoder(config=self.config)
        transport = hook.ossensor_transport(config=self.config, encoder=encoder)
        if transport is None:
            raise PluginError(f"transport plugin {self.config.transport!r} returned no transport")
        self.transport: Transport = transport
        self.captures: dict[int, _Capture] = {}
        self.vsensor_filter = ""
        self.vsensor_peers: AddressSet | None = None
        self.filter_notes: dict[str, None] = {}  # why the peer exclusion is left out, if it is
        self.closed_stats: dict[str, CaptureStats] = {}
        # The single-copy rules (node/placement.py): which copy each interface keeps.
        self.single_copy = SingleCopy(self.config, prepared.placement)
        # Chunk sequence numbers increase across restarts (they start from the clock), so a
        # vSensor that remembers stored sequences never mistakes a new run's chunks for retries.
        self.chunker = Chunker(self.config.name, self.filters, self.config.chunk_bytes,
                               self.config.chunk_seconds, self.interface_table, time.time_ns())
        self._pending_started = asyncio.Event()  # wakes the flush timer
        self.queue: asyncio.Queue[Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self.chunks_sent = 0
        self.packets_sent = 0

    # -- filters ----------------------------------------------------------------------------

    def kernel_filter(self) -> str:
        """``(vSensor filter) and (plugin filters and BPF)``."""
        return combine_filters(self.vsensor_filter, self.prepared.kernel_filter)

    def build(self, linktype: int, placement: str, vsensor: str,
              peers: AddressSet | None) -> tuple[BpfProgram, list[tuple[str, str]]]:
        """libpcap's program for the expressions, behind the generated peer exclusion (when the
        vSensor sent one and it fits; otherwise without it), and the notes on what was left
        out. Reads no state of the sensor: it runs in a thread when the node changes."""
        # The vSensor's part and the interface's single-copy rule are compiled alone and
        # bounds-checked (``capture/bounded.py``): a frame too short for them is left to the
        # user's program instead of being rejected.
        program, note = fit_bounded(vsensor, self.prepared.kernel_filter, linktype, placement)
        program.check_kernel_limit()
        notes = [(note, "")] if note else []
        if peers is None or not len(peers):
            return program, notes
        # Never a blind sensor: what does not fit is left out, and stored twice instead.
        program, note = fit_exclusion(peers, program)
        if note:
            notes.append((note, "; that traffic with other sensors is stored twice"))
        return program, notes

    def program(self, linktype: int, placement: str = "") -> BpfProgram:
        """The kernel filter for a capture of ``linktype``: the vSensor's, ``placement`` (the
        interface's single-copy rule, ``""`` for none) and the user's."""
        program, notes = self.build(linktype, placement, self.vsensor_filter, self.vsensor_peers)
        for note, consequence in notes:
            self._note(linktype, note, consequence)
        return program

    def _note(self, linktype: int, note: str, consequence: str) -> None:
        """A part of the filter left out: logged once, reported with the heartbeats."""
        if note and f"link type {linktype}: {note}" not in self.filter_notes:
            self.filter_notes[f"link type {linktype}: {note}"] = None
            log.warning("link type %d: %s%s", linktype, note, consequence)

    def set_vsensor_filter(self, expression: str, peers: AddressSet | None = None) -> str:
        """Compile for every link type in use first, then swap: all or nothing. ``peers``: the
        ranges whose traffic other sensors store (``bpfgen``). Returns a note for the vSensor
        ("" when the whole filter is in place)."""
        previous = self.vsensor_filter, self.vsensor_peers
        self.vsensor_filter, self.vsensor_peers = expression.strip(), peers
        self.filter_notes = {}
        try:
            programs = {i: self.program(c.source.linktype, c.placement)
                        for i, c in self.captures.items()}
        except FilterError:
            self.vsensor_filter, self.vsensor_peers = previous
            raise
        for index, capture in self.captures.items():
            capture.source.set_filter(programs[index])
        log.info("kernel filter is now %r%s", self.kernel_filter(),
                 f" behind the peer exclusion ({peers.summary()}, id {peers.digest()})"
                 if peers is not None and len(peers) else "")
        return "; ".join(self.filter_notes)

    def filter_note(self) -> str:
        return "; ".join(self.filter_notes)

    def capture_stats(self) -> dict[str, CaptureStats]:
        return self.all_stats()

    def refresh_filters(self) -> None:
        self.transport.refresh()

    def captured_interfaces(self) -> list[Interface]:
        return [c.source.interface for c in self.captures.values()]

    def filter_version(self) -> str:
        """A short digest of the filter in force: it changes exactly when the filter does."""
        peers = self.vsensor_peers.digest() if self.vsensor_peers is not None else ""
        text = f"{self.kernel_filter()}\n{peers}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def stats(self) -> SensorStats:
        """The sensor's own counters and state now (for health and metrics)."""
        return SensorStats(self.chunks_sent, self.packets_sent, self.queue.qsize(),
                           tuple(c.source.interface.name for c in self.captures.values()),
                           self.kernel_filter(), self.filter_version(),
                           tuple(p.name for p in self.single_copy.plan.unplaced()))

    # -- captures ---------------------------------------------------------------------------

    def open_capture(self, interface: Interface) -> None:
        if interface.index in self.captures or interface.linktype is None:
            return
        placement = self.single_copy.opening(interface)
        try:
            source = self.backend.open(interface, self.program(interface.linktype, placement))
        except (CaptureError, OssensorError) as exc:
            log.error("cannot capture on %s: %s", interface.name, exc)
            return
        task = asyncio.get_running_loop().create_task(self._capture_loop(source),
                                                     name=f"capture-{interface.name}")
        self.captures[interface.index] = _Capture(source, task, placement)
        placed = self.single_copy.plan.placements.get(interface.index)
        log.info("capturing on %s (index %d, link type %d, %s%s)", interface.name, interface.index,
                 source.linktype, "up" if interface.up else "down: captured once up",
                 f", single copy: {placed.role}" if placed is not None and placement else "")

    async def close_capture(self, index: int, drain: bool) -> None:
        await self.close_captures([index], drain)

    async def close_captures(self, indexes: list[int], drain: bool) -> None:
        """Stop the capture tasks, wait until partly filled ring blocks are handed over, read
        what is left, then close: what was captured before the stop is kept."""
        captures = [c for c in (self.captures.pop(i, None) for i in indexes) if c is not None]
        for capture in captures:
            capture.task.cancel()
        await asyncio.gather(*(c.task for c in captures), return_exceptions=True)
        if drain and captures:
            await asyncio.sleep(max(c.source.flush_seconds for c in captures))
        for capture in captures:
            await self._finish(capture, drain)

    async def _finish(self, capture: _Capture, drain: bool) -> None:
        if drain:
            try:
                for batch in capture.source.read():
                    await self._accept(batch)
            except CaptureError as exc:
                log.warning("final read on %s failed: %s", capture.source.interface.name, exc)
        name = capture.source.interface.name
        try:
            self.closed_stats.pop(name, None)  # re-inserted last: the front is the oldest
            self.closed_stats[name] = capture.source.stats()
        except CaptureError:
            pass
        while len(self.closed_stats) > _CLOSED_KEPT:
            del self.closed_stats[next(iter(self.closed_stats))]
        capture.source.close()

    async def _capture_loop(self, source: CaptureSource) -> None:
        name = source.interface.name
        loop = asyncio.get_running_loop()
        # One reader for the life of the capture (level-triggered: it fires while the ring has
        # a block for us), not one per wait: two epoll_ctl calls fewer per ring block.
        readable = asyncio.Event()
        fd = source.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                readable.clear()
                batches = source.read()
                if not batches:
                    await readable.wait()
                    continue
                for batch in batches:
                    await self._accept(batch)
                # Let the sender, the timers and the other captures run between reads.
                await asyncio.sleep(0)
        except CaptureError as exc:
            log.error("capture on %s stopped: %s", name, exc)
        finally:
            loop.remove_reader(fd)

    # -- batches and chunks -----------------------------------------------------------------

    async def _accept(self, batch: PacketBatch) -> None:
        was_empty = not self.chunker.pending
        chunk = self.chunker.add(batch)
        if was_empty and self.chunker.pending:
            self._pending_started.set()
        if chunk is not None:
            await self.queue.put(chunk)

    async def _cut(self) -> None:
        chunk = self.chunker.cut()
        if chunk is not None:
            await self.queue.put(chunk)

    def interface_table(self) -> tuple[InterfaceCounters, ...]:
        """The chunk's interface table (format v2): every capture's kernel counters now."""
        stats = self.all_stats()
        return tuple(InterfaceCounters(c.source.interface.name, c.source.interface.index,
                                       c.source.linktype, stats[name].packets,
                                       stats[name].drops)
                     for c in self.captures.values()
                     if (name := c.source.interface.name) in stats)

    async def _flush_timer(self) -> None:
        """Cut a chunk ``chunk_seconds`` after its first batch: asleep until then, and not
        woken at all while nothing is pending (a quiet node)."""
        while True:
            await self._pending_started.wait()
            self._pending_started.clear()
            while self.chunker.pending:
                due = self.chunker.seconds_left()
                if due > 0:
                    await asyncio.sleep(due)
                else:
                    await self._cut()

    async def _send_loop(self) -> None:
        while (chunk := await self.queue.get()) is not None:
            delay = 0.5
            while True:
                try:
                    await self.transport.send(chunk)
                    break
                except TransportError as exc:
                    log.error("transport %s did not take chunk %d (%d packets), retrying in "
                              "%.1f s: %s", self.transport.name, chunk.sequence, chunk.packets,
                              delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self.chunks_sent += 1
            self.packets_sent += chunk.packets
            self.prepared.plugins.hook.ossensor_chunk_sent(config=self.config, chunk=chunk)

    # -- periodic work and interface events -------------------------------------------------

    def all_stats(self) -> dict[str, CaptureStats]:
        stats = dict(self.closed_stats)
        for capture in self.captures.values():
            try:
                stats[capture.source.interface.name] = capture.source.stats()
            except CaptureError as exc:
                log.warning("no counters for %s: %s", capture.source.interface.name, exc)
        return stats

    def report_stats(self) -> None:
        for name, stats in sorted(self.all_stats().items()):
            log.log(level(1), "capture %s: %d packets, %d kernel drops", name, stats.packets,
                    stats.drops)
            self.prepared.plugins.hook.ossensor_capture_stats(config=self.config, interface=name,
                                                              stats=stats)

    async def _stats_timer(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_seconds)
            self.report_stats()

    async def _watch(self) -> None:
        watch = InterfaceWatch(self.prepared.decide, self.config.device_any,
                               self.prepared.interfaces)
        try:
            async for event in watch.events():
                await self._on_event(event)
        except InterfaceError as exc:
            log.error("%s; interfaces that appear or return are not picked up", exc)

    async def _on_event(self, event: InterfaceEvent) -> None:
        interface = event.interface
        if event.kind == "added":
            self.open_capture(interface)
        elif event.kind == "removed":
            log.info("interface %s (index %d) went away", interface.name, interface.index)
            await self.close_capture(interface.index, drain=True)
        else:
            log.info("interface %s is %s", interface.name, event.kind)
        self.prepared.plugins.hook.ossensor_interface_event(config=self.config, event=event)

    # -- the whole run ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event,
                  companions: Sequence[Coroutine[Any, Any, None]] = ()) -> None:
        """Capture and ship until ``stop`` is set, then flush. ``companions`` run beside the
        pipeline and are cancelled at the stop (``ossensor run`` keeps the health status with
        one)."""
        hook = self.prepared.plugins.hook
        # to_thread's pool (chunk encoding, netlink): named, so per-thread CPU is legible.
        # All of its threads from the start: a count that grows under load would hide a leak.
        asyncio.get_running_loop().set_default_executor(
            named_executor("ossensor-pool", start_all=True))
        # Asked once, before start-up: the antigena plugin hands these to the actions it gets.
        enforcers = [e for e in hook.ossensor_response_enforcer(config=self.config)
                     if e is not None]
        hook.ossensor_startup(config=self.config, control=self)
        await self.transport.start(self)
        sender = asyncio.create_task(self._send_loop(), name="sender")
        for interface in self.prepared.selected:
            self.open_capture(interface)
        if not self.prepared.selected:
            log.warning("no interface matches yet; waiting for matching interfaces to appear "
                        "(NETWORK_DEVICE_ANY=1)")
        background = [asyncio.create_task(coro, name=name) for coro, name in
                      ((self._watch(), "watch"), (self._flush_timer(), "flush"),
                       (self._stats_timer(), "stats"))]
        if self.config.single_copy_active:
            log.info("single copy: on; %d interfaces placed", len(self.single_copy.plan.placements))
            for note in self.single_copy.plan.notes():
                log.warning("single copy: %s", note)
            background.append(asyncio.create_task(self.single_copy.follow(self),
                                                  name="placement"))
        background += [asyncio.create_task(coro) for coro in companions]
        if self.config.antigena_enabled and ("antigena", "antigena") not in \
                self.prepared.plugins.loaded:
            log.warning("ANTIGENA_ENABLED is true but the antigena plugin is not loaded "
                        "(OSSENSOR_DISABLE_PLUGINS): no response action will be received")
        elif self.config.antigena_enabled and not enforcers:
            log.warning("ANTIGENA_ENABLED is true but no installed plugin enforces response "
                        "actions: none will be enforced")
        if self.config.single_copy and not self.config.every_interface:
            log.info("single copy: off, as not every interface is captured (NETWORK_DEVICE_ANY=1 "
                     "without OSSENSOR_NETWORK_DEVICE or include/exclude lists)")
        log.info("sensor %s running: backend %s, transport %s, filter %r", self.config.name,
                 self.backend.name, self.transport.name, self.prepared.kernel_filter)
        try:
            await stop.wait()
        finally:
            log.info("stopping: flushing captures")
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.close_captures(list(self.captures), drain=True)
            await self._cut()
            await self.queue.put(None)
            try:
                await asyncio.wait_for(sender, SHUTDOWN_GRACE_SECONDS)
            except TimeoutError:
                log.error("transport did not finish within %.0f s; %d chunks not delivered",
                          SHUTDOWN_GRACE_SECONDS, self.queue.qsize())
            try:
                await self.transport.aclose()
            except TransportError as exc:
                log.error("transport %s did not close cleanly: %s", self.transport.name, exc)
            self.report_stats()
            log.info("stopped: %d chunks, %d packets handed to transport %s", self.chunks_sent,
                     self.packets_sent, self.transport.name)
            hook.ossensor_shutdown(config=self.config)

