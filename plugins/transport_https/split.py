"""A chunk the vSensor (or a proxy in front of it) refuses as too large (413): split and resent.

A 413 must never block the queue behind it. The chunk is decoded and cut in two: into halves of
its batches, or, for a single batch, into halves of its records. Each part is a chunk of its
own with a new sequence number and is queued in the original's place (so it goes next); a part
refused again is split again, so the work ends after at most log2(records) rounds. A single
record the vSensor will not take cannot be split: the caller drops it as a counted, logged loss.

Part sequence numbers come from their own range (bit 63 set, then the clock at start-up in
nanoseconds, counting up): the chunker's start at the clock below 2^63, so a part never takes a
sequence that a chunk of this run or of an earlier one has, and the vSensor's de-duplication of
retries keeps working for parts too.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator

from ossensor_core.pipeline.contracts import ChunkEncoder

PART_SEQUENCE_BASE = 1 << 63


def part_sequences() -> Iterator[int]:
    """Sequence numbers for parts (see the module docstring)."""
    return itertools.count(PART_SEQUENCE_BASE + time.time_ns())


def split_chunk(encoder: ChunkEncoder, payload: bytes, version: int,
                sequences: tuple[int, int]) -> list[tuple[int, int, bytes]] | None:
    """The two halves of an encoded chunk, each ``(sequence, packets, payload)`` encoded in
    ``version``; None when it holds a single record (or none), which cannot be split."""
    chunk = encoder.decode(payload)
    batches = [b for b in chunk.batches if len(b)]
    if len(batches) >= 2:
        middle = len(batches) // 2
        halves = [tuple(batches[:middle]), tuple(batches[middle:])]
    elif batches and len(batches[0]) >= 2:
        batch = batches[0]
        middle = len(batch) // 2
        halves = [(batch[:middle],), (batch[middle:],)]
    else:
        return None
    parts = []
    for sequence, half in zip(sequences, halves):
        part = dataclasses.replace(chunk, sequence=sequence, batches=half)
        encoded = encoder.encode(part) if version == 1 else encoder.encode(part, version=version)
        parts.append((sequence, part.packets, encoded))
    return parts
