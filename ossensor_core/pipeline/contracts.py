"""The small typed interfaces behind which per-batch work happens.

Hooks (``hookspecs.py``) are called at start-up and on events; they return objects that satisfy
these contracts, and the pipeline calls their methods directly, once per batch or per chunk.

Every member that anyone reads is declared here. Where a member is optional, the contract is a
base class that gives it a default (``Transport.refresh`` does nothing, ``Transport.stats``
reports nothing, ``ResponseEnforcer.prepare`` and ``close`` do nothing): plugins subclass it,
and nobody probes an object for a member with ``getattr``. Capture sources, backends and
filters have no optional members and stay structural protocols.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.capture.bpf import BpfProgram
from ossensor_core.node.interfaces import Interface
# The chunk and its encoder are the wire format's; every contract is importable from here.
from ossensor_core.wire.chunk import Chunk, ChunkEncoder, InterfaceCounters

if TYPE_CHECKING:
    from ossensor_core.capture.peer_exclusion import AddressSet


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


@runtime_checkable
class SensorControl(Protocol):
    """What a transport may ask of the running sensor (given to ``Transport.start``)."""

    def set_vsensor_filter(self, expression: str, peers: AddressSet | None = None) -> str:
        """AND ``expression`` (the vSensor's filter) into the kernel filter of every capture,
        now and for captures opened later, behind the generated exclusion of ``peers`` (the
        ranges whose traffic other sensors store); swapped in place, nothing lost. An empty
        expression removes it. Returns a note for the vSensor: why part of the peer exclusion
        was left out ("" when all of it is in place). Raises FilterError (and changes nothing)
        when the filter does not compile or fit."""

    def filter_note(self) -> str:
        """Why part of the peer exclusion is left out now ("" when all of it is in place): it
        changes also when a capture of a new link type opens, so a transport reads it with each
        heartbeat."""

    def capture_stats(self) -> dict[str, CaptureStats]:
        """Cumulative kernel counters by interface name."""

    def captured_interfaces(self) -> list[Interface]:
        """The interfaces being captured now."""

    def refresh_filters(self) -> None:
        """Ask the transport for the vSensor's filter now rather than with its next heartbeat
        (the vSensor said that the set of sensors changed); a no-op for transports without a
        vSensor."""


@dataclass(frozen=True)
class TransportStats:
    """What a transport reports of itself, for metrics and health. ``None``: the transport has
    no such thing (the file transport neither registers nor spools), and no series is shown."""

    chunks_sent: int | None = None
    packets_sent: int | None = None
    bytes_sent: int | None = None
    chunks_spooled: int | None = None
    chunks_dropped: int | None = None
    packets_dropped: int | None = None
    reregistrations: int | None = None
    chunk_retries: int | None = None
    queued_chunks: int | None = None  # now, not cumulative
    memory_queued_bytes: int | None = None  # now
    spooled_chunks: int | None = None  # now
    spooled_bytes: int | None = None  # now
    #: True while registered with the vSensor; None for a transport that has none to wait for.
    registered: bool | None = None


class Transport(ABC):
    """Stores or ships chunks; one transport is chosen with ``OSSENSOR_TRANSPORT``.

    ``send`` must not lose an accepted chunk: it retries or spools, and raises TransportError only
    when it cannot keep the chunk at all. ``aclose`` flushes what is pending.
    """

    name: str

    @abstractmethod
    async def start(self, control: SensorControl) -> None:
        """Open files or connections; called once before the first chunk. ``control`` lets a
        transport that talks to a vSensor apply the filter it hands out."""

    @abstractmethod
    async def send(self, chunk: Chunk) -> None:
        """Accept one chunk."""

    @abstractmethod
    async def aclose(self) -> None:
        """Flush and close; called once at shutdown."""

    def refresh(self) -> None:
        """Ask the vSensor for its filters at once rather than at the next heartbeat (not a
        coroutine). ``SensorControl.refresh_filters`` calls it. Default: nothing to ask."""

    def stats(self) -> TransportStats:
        """Counters for metrics and health; called at a scrape or a status write, never per
        chunk. Default: nothing to report."""
        return TransportStats()


class ResponseEnforcer(ABC):
    """Enforces Antigena response actions on the traffic the sensor sees (the antigena plugin
    calls these, once per batch, for the actions in force)."""

    name: str

    @abstractmethod
    def enforce(self, batch: PacketBatch, actions: Sequence[object]) -> int:
        """Act on the packets of ``batch`` that match ``actions``; return how many acted on."""

    def prepare(self) -> None:
        """Load what enforcing needs (a library, a table); called off the event loop before the
        first action, and again after a failure. Default: nothing to load."""

    def close(self) -> None:
        """Release sockets and the like; called once at shutdown. Default: nothing held."""


@dataclass(frozen=True)
class MetricSample:
    """One value a plugin contributes to ``/metrics`` (hook ``ossensor_metrics``). ``name`` is
    the series name without ``_total``; a counter is shown with it."""

    name: str
    help: str
    value: float
    kind: Literal["counter", "gauge"] = "gauge"
    labels: Mapping[str, str] = field(default_factory=dict)
