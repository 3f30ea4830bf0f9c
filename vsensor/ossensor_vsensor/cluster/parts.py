"""Reading a chunk message of the stream: its headers checked, its parts put back together.

What comes out of NATS is as hostile as what comes from the network (a replica may be buggy or
compromised), so :func:`read_headers` checks every header against the subject before anything
is kept: the sensor name (bounded) must give the subject's token and partition, the sequence is
an unsigned 64-bit number, a part number ``i/n`` has ``1 <= i <= n <= max_parts``.

:class:`Reassembly` holds the parts of the chunks of one partition that are not complete yet.
Parts of one chunk are published in order by one replica, but parts of other chunks (another
sensor, or the same sensor's retry through another replica) may come between them, so several
chunks may be open at once. Everything is bounded: how many chunks are open, the bytes they
hold, and how long one may wait for its missing parts. A chunk that stays incomplete was never
acknowledged to its sensor (a replica answers only once every part is stored), so the sensor
sends it again: dropping it loses nothing that was promised. Its messages are then acknowledged
so that they leave the stream.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import PARTITIONS, SUBJECT_PREFIX, partition
from .names import token

#: Header names of a chunk message (see the package docstring).
H_SENSOR = "Ossensor-Sensor"
H_SEQUENCE = "Ossensor-Sequence"
H_PART = "Ossensor-Part"
#: The longest sensor name taken from a header (the protocol allows 253 characters; UTF-8
#: names may take up to four bytes each).
MAX_SENSOR_BYTES = 1024
#: How long the parts of an incomplete chunk are kept; below the consumers' ``ack_wait``
#: (60 s) so that a held part is never redelivered while it is held.
PART_WAIT_SECONDS = 30.0
#: Incomplete chunks held at once per partition, and the bytes they may hold together.
MAX_OPEN_CHUNKS = 8


class BadMessage(ValueError):
    """A message that is not a chunk (or part) by the contract; the text says why, briefly."""


@dataclass(frozen=True)
class Header:
    """What the headers of a message say, once checked."""

    sensor: str
    sequence: int
    part: int = 1
    parts: int = 1


def read_headers(subject: str, headers: dict[str, str] | None, max_parts: int) -> Header:
    """The checked headers of a chunk message; :class:`BadMessage` otherwise."""
    headers = headers or {}
    sensor = headers.get(H_SENSOR, "")
    if not sensor or len(sensor.encode(errors="replace")) > MAX_SENSOR_BYTES:
        raise BadMessage(f"missing or overlong {H_SENSOR} header")
    text = headers.get(H_SEQUENCE, "")
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 1 << 64):
        raise BadMessage(f"bad {H_SEQUENCE} header {text[:30]!r}")
    sequence = int(text)
    expected = f"{SUBJECT_PREFIX}.{partition(sensor, PARTITIONS)}.{token(sensor)}"
    if subject != expected:
        raise BadMessage(f"subject {subject[:120]!r} is not the sensor's ({expected[:120]!r})")
    part_text = headers.get(H_PART)
    if part_text is None:
        return Header(sensor, sequence)
    i, slash, n = part_text.partition("/")
    if not (slash and i.isascii() and i.isdigit() and n.isascii() and n.isdigit()
            and len(i) <= 6 and len(n) <= 6 and 1 <= int(i) <= int(n) <= max_parts):
        raise BadMessage(f"bad {H_PART} header {part_text[:30]!r} (at most {max_parts} parts)")
    return Header(sensor, sequence, int(i), int(n))


@dataclass
class OpenChunk:
    """The parts of one chunk received so far, with their messages (acknowledged together)."""

    parts: int
    started: float
    bodies: dict[int, bytes] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)
    sequences: dict[int, int | None] = field(default_factory=dict)  # part -> stream sequence
    positions: dict[int, int] = field(default_factory=dict)  # part -> index in messages
    size: int = 0


#: A chunk given up: why, its key ``(sensor, sequence, parts)`` and what it held.
Dropped = tuple[str, tuple[str, int, int], OpenChunk]


class Reassembly:
    """The incomplete chunks of one partition, bounded in count, bytes and age."""

    def __init__(self, max_bytes: int, max_open: int = MAX_OPEN_CHUNKS,
                 wait: float = PART_WAIT_SECONDS) -> None:
        self.max_bytes, self.max_open, self.wait = max_bytes, max_open, wait
        self.open: OrderedDict[tuple[str, int, int], OpenChunk] = OrderedDict()
        self.size = 0

    def add(self, header: Header, message: Any, body: bytes, now: float | None = None,
            stream_sequence: int | None = None) -> tuple[bytes | None, list[Any], list[Dropped]]:
        """Keep one part. Returns ``(body, messages, dropped)``: the whole body and every
        message of the chunk once its last part came (else None and []), and the chunks dropped
        to stay in bounds (:data:`Dropped`), whose messages are to be acknowledged.

        A part held already is never acknowledged on its own: when it is the same stream
        message delivered again (``stream_sequence``), the newer delivery replaces the held
        one; another copy is left unacknowledged, to come back and be dropped with its own
        incomplete chunk, so that no acknowledgement can ever take a held part away."""
        now = time.monotonic() if now is None else now
        key = (header.sensor, header.sequence, header.parts)
        dropped: list[Dropped] = []
        chunk = self.open.get(key)
        if chunk is None:
            chunk = OpenChunk(header.parts, now)
            self.open[key] = chunk
        if header.part in chunk.bodies:
            held = chunk.sequences.get(header.part)
            if held is not None and held == stream_sequence:
                index = chunk.positions[header.part]
                chunk.messages[index] = message
            return None, [], dropped
        chunk.bodies[header.part] = body
        chunk.sequences[header.part] = stream_sequence
        chunk.positions[header.part] = len(chunk.messages)
        chunk.messages.append(message)
        chunk.size += len(body)
        self.size += len(body)
        if len(chunk.bodies) == chunk.parts:
            del self.open[key]
            self.size -= chunk.size
            whole = b"".join(chunk.bodies[i] for i in range(1, chunk.parts + 1))
            return whole, chunk.messages, dropped
        while self.open and (len(self.open) > self.max_open or self.size > self.max_bytes):
            old_key, old = self.open.popitem(last=False)
            self.size -= old.size
            dropped.append((f"more than {self.max_open} incomplete chunks or "
                            f"{self.max_bytes} bytes held", old_key, old))
        return None, [], dropped

    def expired(self, now: float | None = None) -> list[Dropped]:
        """Drop the chunks whose parts waited longer than :attr:`wait`."""
        now = time.monotonic() if now is None else now
        dropped = []
        for key, chunk in list(self.open.items()):
            if now - chunk.started > self.wait:
                del self.open[key]
                self.size -= chunk.size
                dropped.append((f"parts missing after {self.wait:g} s", key, chunk))
        return dropped
