"""Reading a chunk message of the stream: its headers checked, its parts put back together.

What comes out of NATS is as hostile as what comes from the network (a replica may be buggy or
compromised), so :func:`read_headers` checks every header against the subject before anything
is kept: the sensor name (bounded) must give the subject's token and partition, the sequence is
an unsigned 64-bit number, a part number ``i/n`` has ``1 <= i <= n <= max_parts``.

:class:`Reassembly` holds the parts of the chunks of one partition that are not complete yet.
Parts of one chunk are published in order by one replica, but parts of other chunks (another
sensor, or the same sensor's retry through another replica) may come between them, and a retry
adds only the parts that failed, so parts are collected by chunk and number, several chunks
open at once. Everything is bounded: how many chunks are open, the bytes they hold, and how
long one may wait for its missing parts (longer than JetStream's de-duplication window: after
it, a retry publishes every part again, so a chunk still incomplete then was never acknowledged
to its sensor, which sends it again). Dropping it loses nothing that was promised; its messages
are acknowledged so that they leave the stream.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import H_PART, H_SENSOR, H_SEQUENCE, PARTITIONS, SUBJECT_PREFIX, partition
from .names import token

#: The longest sensor name taken from a header (the protocol allows 253 characters; UTF-8
#: names may take up to four bytes each).
MAX_SENSOR_BYTES = 1024
#: How long the parts of an incomplete chunk are kept, beyond JetStream's de-duplication
#: window (the worker passes the stream's own plus this): a sensor's retry of a chunk whose
#: last parts failed adds only those within the window (the stored ones are duplicates), and
#: all of them again after it. Held parts are kept "in progress" meanwhile, so that the
#: consumer's ``ack_wait`` does not hand them out again.
PART_WAIT_SECONDS = 150.0
PART_WAIT_MARGIN = 30.0
#: Incomplete chunks held at once per partition, and the bytes they may hold together.
MAX_OPEN_CHUNKS = 8


class BadMessage(ValueError):
    """A message that is not a chunk (or part) by the contract; the text says why, briefly,
    and :attr:`culprit` names what broke it (a header's name, or ``"subject"``), so that no
    one has to read the text to find out."""

    def __init__(self, culprit: str, why: str) -> None:
        super().__init__(why)
        self.culprit = culprit


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
    try:  # a lone surrogate (a header read with surrogateescape) has no UTF-8, hence no token
        size = len(sensor.encode())
    except UnicodeEncodeError:
        raise BadMessage(H_SENSOR, f"{H_SENSOR} header is not UTF-8") from None
    if not sensor or size > MAX_SENSOR_BYTES:
        raise BadMessage(H_SENSOR, f"missing or overlong {H_SENSOR} header")
    text = headers.get(H_SEQUENCE, "")
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) < 1 << 64):
        raise BadMessage(H_SEQUENCE, f"bad {H_SEQUENCE} header {_shown(text, 40)}")
    sequence = int(text)
    expected = f"{SUBJECT_PREFIX}.{partition(sensor, PARTITIONS)}.{token(sensor)}"
    if subject != expected:
        raise BadMessage("subject",
                         f"subject {_shown(subject, 120)} is not the sensor's "
                         f"({_shown(expected, 120)})")
    part_text = headers.get(H_PART)
    if part_text is None:
        return Header(sensor, sequence)
    i, slash, n = part_text.partition("/")
    if not (slash and i.isascii() and i.isdigit() and n.isascii() and n.isdigit()
            and len(i) <= 6 and len(n) <= 6 and 1 <= int(i) <= int(n) <= max_parts):
        raise BadMessage(H_PART,
                         f"bad {H_PART} header {_shown(part_text, 40)} (at most {max_parts} parts)")
    return Header(sensor, sequence, int(i), int(n))


def _shown(text: str, limit: int) -> str:
    """``text`` quoted for a refusal, at most ``limit`` characters escapes included (a
    character may take ten once escaped), on one line."""
    shown = repr(text[:limit])
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


@dataclass
class OpenChunk:
    """The parts of one chunk received so far, with their messages (acknowledged together)."""

    parts: int
    started: float
    bodies: dict[int, bytes] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)
    touched: float = 0.0  # when its messages were last kept in progress
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
            chunk = OpenChunk(header.parts, now, touched=now)
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

    def to_touch(self, every: float, now: float | None = None) -> list[Any]:
        """The messages of chunks not kept in progress for ``every`` seconds (marked now)."""
        now = time.monotonic() if now is None else now
        due = []
        for chunk in self.open.values():
            if now - chunk.touched >= every:
                chunk.touched = now
                due += chunk.messages
        return due

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
