"""Filtering batches and cutting them into chunks: the part of the run loop that does no I/O.

The sensor (``pipeline/sensor.py``) and the testing kit (``ossensor_core.testing``) both feed
batches to a :class:`Chunker`, so what passes in a plugin author's test passes in the sensor:
the same filters in the same order, the same cut by size and by age, the same sequence numbers
and interface table. Work is per batch; nothing here runs per packet unless
``OSSENSOR_DEBUG=5`` asks for every packet as hex.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.runtime.logsetup import level
from ossensor_core.pipeline.contracts import Chunk, InterfaceCounters, PacketFilter

log = logging.getLogger("ossensor.sensor")

#: Every capture's interface and kernel counters now, for the chunk's interface table.
InterfaceTable = Callable[[], tuple[InterfaceCounters, ...]]


class Chunker:
    """Runs the user-space filters on each batch and keeps the kept batches until a chunk is
    cut: when their records reach ``chunk_bytes``, or ``chunk_seconds`` after the first one
    (the caller asks :meth:`seconds_left` and calls :meth:`cut`)."""

    def __init__(self, sensor: str, filters: Sequence[PacketFilter], chunk_bytes: int,
                 chunk_seconds: float, interfaces: InterfaceTable, sequence: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sensor = sensor
        self.filters = list(filters)
        self.chunk_bytes = chunk_bytes
        self.chunk_seconds = chunk_seconds
        self.interfaces = interfaces
        #: The sequence number of the last chunk cut; the next one gets one more.
        self.sequence = sequence
        self.clock = clock
        self.pending: list[PacketBatch] = []
        self.pending_bytes = 0
        self.pending_since = 0.0

    def filter(self, batch: PacketBatch) -> PacketBatch:
        """Every packet filter in plugin order; stops at an empty batch."""
        for packet_filter in self.filters:
            batch = packet_filter.filter(batch)
            if not batch.count:
                break
        return batch

    def add(self, batch: PacketBatch) -> Chunk | None:
        """Filter ``batch`` and keep what is left; a chunk when this reached ``chunk_bytes``."""
        batch = self.filter(batch)
        if not batch.count:
            return None
        return self.append(batch)

    def append(self, batch: PacketBatch) -> Chunk | None:
        """Keep an already filtered, non-empty ``batch``; a chunk when this reached
        ``chunk_bytes``."""
        if log.isEnabledFor(level(5)):
            for packet in batch.packets():
                log.log(level(5), "%s %d.%09d len %d %s", batch.interface,
                        packet.timestamp_ns // 10**9, packet.timestamp_ns % 10**9,
                        packet.wire_length, packet.data.hex())
        if not self.pending:
            self.pending_since = self.clock()
        self.pending.append(batch)
        self.pending_bytes += len(batch.data)
        if self.pending_bytes >= self.chunk_bytes:
            return self.cut()
        return None

    def seconds_left(self) -> float:
        """Seconds until the pending batches are due to be cut (infinite while none are)."""
        if not self.pending:
            return math.inf
        return self.pending_since + self.chunk_seconds - self.clock()

    def cut(self) -> Chunk | None:
        """The pending batches as a chunk (None when there are none); they are no longer
        pending."""
        if not self.pending:
            return None
        chunk = self.chunk_of(self.pending)
        self.pending, self.pending_bytes = [], 0
        return chunk

    def chunk_of(self, batches: Sequence[PacketBatch]) -> Chunk:
        """``batches`` as the next chunk: the next sequence number and the interface table
        now (every capture's kernel counters, so that a vSensor sees drops with the packets).
        The transport adds the instance id, which is its own."""
        self.sequence += 1
        chunk = Chunk(self.sensor, self.sequence, tuple(batches), time.time_ns(),
                      interfaces=self.interfaces())
        log.log(level(4), "chunk %d: %d packets, %d record bytes, %d batches from %s",
                chunk.sequence, chunk.packets, chunk.record_bytes, len(chunk.batches),
                ",".join(sorted({b.interface for b in chunk.batches})))
        return chunk
