"""The small typed interfaces behind which per-batch work happens.

Hooks (``hookspecs.py``) are called at start-up and on events; they return objects that satisfy
these protocols, and the pipeline calls their methods directly, once per batch or per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.bpf import BpfProgram
from ossensor_core.node.interfaces import Interface


@dataclass(frozen=True)
class CaptureStats:
    """Cumulative counters of one capture since it opened.

    ``packets`` and ``drops`` come from the kernel (``PACKET_STATISTICS``): packets that passed
    the kernel filter, and those among them the kernel dropped because user space was too slow.
    """

    packets: int = 0
    drops: int = 0


@runtime_checkable
class CaptureSource(Protocol):
    """One open capture on one interface (Zeek's PktSrc: open, filter, read, statistics, close)."""

    interface: Interface
    linktype: int
    #: A packet captured now is readable by :meth:`read` within this many seconds (a ring hands
    #: over a partly filled block on a timeout); the core waits this long before the final read.
    flush_seconds: float

    def fileno(self) -> int:
        """A descriptor that polls readable when :meth:`read` has something to return."""

    def read(self) -> list[PacketBatch]:
        """Return the batches ready now, without blocking (possibly none)."""

    def set_filter(self, program: BpfProgram) -> None:
        """Replace the kernel filter atomically, without reopening the capture."""

    def stats(self) -> CaptureStats:
        """Cumulative kernel counters."""

    def close(self) -> None:
        """Release the socket and any ring; idempotent."""


@runtime_checkable
class CaptureBackend(Protocol):
    """Opens captures; one backend is chosen with ``OSSENSOR_CAPTURE_BACKEND``."""

    name: str

    def open(self, interface: Interface, program: BpfProgram) -> CaptureSource:
        """Open a capture on ``interface`` with ``program`` attached before the first packet.

        Raises CaptureError (with the interface name and the cause) when it cannot.
        """


@runtime_checkable
class PacketFilter(Protocol):
    """A user-space filter: takes a batch, returns it or a sub-batch (``batch.select(...)``)."""

    name: str

    def filter(self, batch: PacketBatch) -> PacketBatch:
        """Return the packets to keep. Must not block or do I/O."""


@dataclass(frozen=True)
class InterfaceCounters:
    """One row of a chunk's interface table: a captured interface and its cumulative kernel
    counters (:class:`CaptureStats`) when the chunk was cut."""

    name: str
    ifindex: int
    linktype: int
    packets: int = 0
    drops: int = 0


@dataclass(frozen=True)
class Chunk:
    """Batches cut together by size or time, the unit that a transport stores or sends.

    ``instance`` (the sending process, stamped by the transport that has one) and
    ``interfaces`` (every interface captured when the chunk was cut, with or without batches
    here) travel in chunk format v2 only; v1 leaves them empty.
    """

    sensor: str
    sequence: int
    batches: tuple[PacketBatch, ...]
    created_ns: int
    instance: str = ""
    interfaces: tuple[InterfaceCounters, ...] = ()
    packets: int = field(init=False)
    record_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packets", sum(b.count for b in self.batches))
        object.__setattr__(self, "record_bytes", sum(len(b.data) for b in self.batches))


@runtime_checkable
class ChunkEncoder(Protocol):
    """Turns a chunk into bytes for the wire (and back, for the receiving side).

    An encoder that writes several versions of ``ossensor-chunk`` lists them in ``versions``
    and takes ``encode(chunk, version=n)``; without ``versions`` it is called as
    ``encode(chunk)`` and taken to write version 1.
    """

    media_type: str

    def encode(self, chunk: Chunk) -> bytes:
        """Serialise and compress a chunk. Pure: no I/O."""

    def decode(self, payload: bytes) -> Chunk:
        """The inverse of :meth:`encode`; raises ValueError on a malformed payload."""


@runtime_checkable
class SensorControl(Protocol):
    """What a transport may ask of the running sensor (given to ``Transport.start``)."""

    def set_vsensor_filter(self, expression: str) -> None:
        """AND ``expression`` (the vSensor's filter) into the kernel filter of every capture,
        now and for captures opened later; swapped in place, nothing lost. An empty expression
        removes it. Raises FilterError (and changes nothing) when it does not compile or fit."""

    def capture_stats(self) -> dict[str, CaptureStats]:
        """Cumulative kernel counters by interface name."""

    def captured_interfaces(self) -> list[Interface]:
        """The interfaces being captured now."""

    def refresh_filters(self) -> None:
        """Ask the transport for the vSensor's filter now rather than with its next heartbeat
        (the vSensor said that the set of sensors changed); a no-op for transports without a
        vSensor."""


@runtime_checkable
class Transport(Protocol):
    """Stores or ships chunks; one transport is chosen with ``OSSENSOR_TRANSPORT``.

    ``send`` must not lose an accepted chunk: it retries or spools, and raises TransportError only
    when it cannot keep the chunk at all. ``aclose`` flushes what is pending.

    Optional: ``refresh()`` (no arguments, not a coroutine): ask the vSensor for its filters at
    once rather than at the next heartbeat. ``SensorControl.refresh_filters`` calls it when a
    transport has it (the https transport does; the file transport has no vSensor to ask).
    """

    name: str

    async def start(self, control: SensorControl) -> None:
        """Open files or connections; called once before the first chunk. ``control`` lets a
        transport that talks to a vSensor apply the filter it hands out."""

    async def send(self, chunk: Chunk) -> None:
        """Accept one chunk."""

    async def aclose(self) -> None:
        """Flush and close; called once at shutdown."""


@runtime_checkable
class ResponseEnforcer(Protocol):
    """Enforces Antigena response actions on the traffic the sensor sees (the antigena plugin
    calls these, once per batch, for the actions in force)."""

    name: str

    def enforce(self, batch: PacketBatch, actions: Sequence[object]) -> int:
        """Act on the packets of ``batch`` that match ``actions``; return how many acted on."""
