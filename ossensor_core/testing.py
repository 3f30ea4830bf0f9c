"""A testing kit for plugin authors (and our own unit tests): no capture, no network, no vSensor.

* :class:`FakeCaptureSource` satisfies :class:`~ossensor_core.pipeline.contracts.CaptureSource` and hands
  over packets given as bytes, ``(timestamp_ns, wire_length, frame)`` tuples, or read from a
  pcap/pcapng file (:func:`read_capture_file`); :class:`FakeCaptureBackend` opens them.
* :class:`RecordingTransport` satisfies :class:`~ossensor_core.pipeline.contracts.Transport` and keeps
  every chunk it is given.
* :func:`build_pipeline` registers a list of plugin modules or objects with the core's own
  defaults, reads a :class:`~ossensor_core.pipeline.config.SensorConfig` (and the plugins' declared
  settings) from an environment dictionary, and returns a :class:`Pipeline` that runs the same
  stages as the sensor: filters per batch, chunks to the transport, hooks at the same points.

A filter plugin's unit test::

    from ossensor_core.testing import FakeCaptureSource, build_pipeline
    import my_package.maxlen as maxlen

    def test_long_frames_are_dropped():
        pipeline = build_pipeline([maxlen], {"OSSENSOR_MAXLEN_LIMIT": "100"})
        chunks = pipeline.run_sync([FakeCaptureSource([bytes(60), bytes(200)])])
        assert [len(f) for f in pipeline.transport.frames()] == [60]

It complements real-capture tests (a namespace, a veth, ``ossensor run``); it never replaces them:
nothing here exercises a kernel filter, a ring, or an interface watch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import select
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossensor_core.capture.batch import Packet, PacketBatch
from ossensor_core.capture.bpf import BpfProgram, compile_filter
from ossensor_core.pipeline.config import SensorConfig, read_core_config
from ossensor_core.errors import CaptureError, ConfigError
from ossensor_core.node.interfaces import Decision, Interface, InterfaceEvent, InterfaceSelector
from ossensor_core.pipeline.loading import LoadedPlugins, new_plugin_manager
from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.pipeline.chunker import Chunker
from ossensor_core.pipeline.contracts import (CaptureBackend, CaptureSource, CaptureStats, Chunk,
                                              ChunkEncoder, InterfaceCounters, PacketFilter,
                                              Transport)
from ossensor_core.pipeline.startup import _configure, decide, kernel_filter, plugin_settings
from ossensor_core.wire.names import LINKTYPE_ETHERNET

#: A packet as the kit accepts it: a frame (stamped now, wire length = its length), a
#: ``(timestamp_ns, wire_length, frame)`` tuple, or a :class:`~ossensor_core.capture.batch.Packet`.
FrameLike = bytes | tuple[int, int, bytes] | Packet

#: The variables :func:`build_pipeline` adds unless the caller gives them: what the core
#: requires, no Antigena, and the kit's own backend and transport names.
TEST_ENVIRONMENT: Mapping[str, str] = {
    "VSENSOR_HOSTNAME": "vsensor.test",
    "VSENSOR_HMAC_KEY": "ossensor-testing-kit-key",
    "OSSENSOR_NAME": "test-sensor",
    "OSSENSOR_CAPTURE_BACKEND": "fake",
    "OSSENSOR_TRANSPORT": "recording",
    "ANTIGENA_ENABLED": "false",
}

_ARPHRD_ETHER = 1
_IFF_UP_RUNNING = 0x1 | 0x40


def fake_interface(name: str = "fake0", index: int = 1000, arphrd: int = _ARPHRD_ETHER,
                   up: bool = True) -> Interface:
    """An :class:`~ossensor_core.node.interfaces.Interface` that exists only in the test."""
    return Interface(name, index, arphrd, _IFF_UP_RUNNING if up else 0)


def _as_frames(packets: Iterable[FrameLike], start_ns: int) -> Iterator[tuple[int, int, bytes]]:
    for n, item in enumerate(packets):
        if isinstance(item, Packet):
            yield item.timestamp_ns, item.wire_length, item.data
        elif isinstance(item, tuple):
            yield item
        else:
            yield start_ns + n * 1000, len(item), bytes(item)


def read_capture_file(path: str | Path) -> tuple[int, list[tuple[int, int, bytes]]]:
    """The link type and ``(timestamp_ns, wire_length, frame)`` of every packet of a pcap or
    pcapng file (scapy's reader; a pcapng file must hold a single link type)."""
    from scapy.utils import RawPcapNgReader, RawPcapReader

    frames: list[tuple[int, int, bytes]] = []
    linktypes: set[int] = set()
    with RawPcapReader(str(path)) as reader:  # pcapng files get scapy's RawPcapNgReader
        pcapng = isinstance(reader, RawPcapNgReader)
        for data, meta in reader:
            if pcapng:
                linktypes.add(meta.linktype)
                units = (meta.tshigh << 32) | meta.tslow
                timestamp_ns = units * 1_000_000_000 // meta.tsresol
            else:
                linktypes.add(reader.linktype)
                fraction = 1 if reader.nano else 1000
                timestamp_ns = meta.sec * 1_000_000_000 + meta.usec * fraction
            frames.append((timestamp_ns, meta.wirelen, bytes(data)))
        linktype = reader.linktype if not linktypes else linktypes.pop()
    if linktypes:
        raise ValueError(f"{path}: mixes link types; the kit replays one link type per source")
    return linktype, frames


def write_capture_file(path: str | Path, packets: Iterable[FrameLike],
                       linktype: int = LINKTYPE_ETHERNET, interface: str = "fake0") -> Path:
    """Write ``packets`` to a pcapng file (as the ``file`` transport would store them) and
    return its path: input for a test of a capture backend or of :func:`read_capture_file`."""
    from ossensor_core.wire.pcapng import PcapngWriter

    with open(path, "wb") as out:
        writer = PcapngWriter(out, linktype)
        source = FakeCaptureSource(packets, interface, linktype)
        try:
            for batch in source.read():
                writer.write_batch(batch)
        finally:
            source.close()
    return Path(path)


class FakeCaptureSource:
    """A :class:`~ossensor_core.pipeline.contracts.CaptureSource` that hands over given packets.

    The packets are cut into batches of ``batch_packets``; :meth:`read` returns every batch not
    yet read, and :meth:`fileno` (one end of a pipe) polls readable exactly while there are some.
    ``programs`` records the kernel filters the pipeline attached (they are not applied).
    """

    flush_seconds = 0.0

    def __init__(self, packets: Iterable[FrameLike] = (),
                 interface: Interface | str = "fake0", linktype: int = LINKTYPE_ETHERNET,
                 batch_packets: int = 256) -> None:
        self.interface = fake_interface(interface) if isinstance(interface, str) else interface
        self.linktype = linktype
        self.programs: list[BpfProgram] = []
        frames = list(_as_frames(packets, time.time_ns()))
        self._pending = [
            PacketBatch.from_frames(self.interface.name, self.interface.index, linktype,
                                    frames[i:i + batch_packets])
            for i in range(0, len(frames), max(1, batch_packets))]
        self._delivered = 0
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        if self._pending:
            os.write(self._write_fd, b"\1")
        self.closed = False

    @classmethod
    def from_file(cls, path: str | Path, interface: Interface | str = "fake0",
                  batch_packets: int = 256) -> FakeCaptureSource:
        """A source that hands over the packets of a pcap or pcapng file, timestamps kept."""
        linktype, frames = read_capture_file(path)
        return cls(frames, interface, linktype, batch_packets)

    @property
    def exhausted(self) -> bool:
        """True once every batch was read."""
        return not self._pending

    def fileno(self) -> int:
        if self.closed:
            raise CaptureError(f"capture on {self.interface.name} is closed")
        return self._read_fd

    def read(self) -> list[PacketBatch]:
        if self.closed:
            raise CaptureError(f"capture on {self.interface.name} is closed")
        try:
            os.read(self._read_fd, 64)
        except BlockingIOError:
            pass
        batches, self._pending = self._pending, []
        self._delivered += sum(b.count for b in batches)
        return batches

    def set_filter(self, program: BpfProgram) -> None:
        self.programs.append(program)

    def stats(self) -> CaptureStats:
        return CaptureStats(self._delivered, 0)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)


class FakeCaptureBackend:
    """A :class:`~ossensor_core.pipeline.contracts.CaptureBackend` opening :class:`FakeCaptureSource`
    objects with the packets given for each interface name (none for the others)."""

    name = "fake"

    def __init__(self, packets: Mapping[str, Iterable[FrameLike]] | None = None,
                 linktype: int = LINKTYPE_ETHERNET) -> None:
        self.packets = {name: list(frames) for name, frames in (packets or {}).items()}
        self.linktype = linktype
        self.opened: list[FakeCaptureSource] = []

    def open(self, interface: Interface, program: BpfProgram) -> FakeCaptureSource:
        source = FakeCaptureSource(self.packets.get(interface.name, ()), interface,
                                   self.linktype)
        source.set_filter(program)
        self.opened.append(source)
        return source


class RecordingTransport(Transport):
    """A :class:`~ossensor_core.pipeline.contracts.Transport` that keeps every chunk in ``chunks``."""

    name = "recording"

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.control: Any = None
        self.started = False
        self.closed = False

    async def start(self, control: Any) -> None:
        self.control, self.started = control, True

    async def send(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    async def aclose(self) -> None:
        self.closed = True

    def packets(self) -> list[Packet]:
        """Every packet of every chunk, in order, as a capture file would hold it."""
        return [p for chunk in self.chunks for batch in chunk.batches for p in batch.packets()]

    def frames(self) -> list[bytes]:
        return [p.data for p in self.packets()]


@dataclass
class RecordingControl:
    """The :class:`~ossensor_core.pipeline.contracts.SensorControl` a transport gets from the kit."""

    sources: list[CaptureSource] = field(default_factory=list)
    vsensor_filters: list[str] = field(default_factory=list)
    refreshes: int = 0

    def set_vsensor_filter(self, expression: str, peers: AddressSet | None = None) -> str:
        self.vsensor_filters.append(expression)
        return ""

    def refresh_filters(self) -> None:
        self.refreshes += 1

    def filter_note(self) -> str:
        return ""

    def capture_stats(self) -> dict[str, CaptureStats]:
        return {s.interface.name: s.stats() for s in self.sources}

    def captured_interfaces(self) -> list[Interface]:
        return [s.interface for s in self.sources]


@dataclass
class Pipeline:
    """The stages :func:`build_pipeline` assembled, run the way the sensor runs them: batches
    go through the sensor's own :class:`~ossensor_core.pipeline.chunker.Chunker` (the same
    filters, cut by size, sequence numbers and interface table)."""

    config: SensorConfig
    plugins: LoadedPlugins
    filters: list[PacketFilter]
    encoder: ChunkEncoder
    transport: Transport
    backend: CaptureBackend | None = None
    control: RecordingControl = field(default_factory=RecordingControl)
    chunker: Chunker = field(init=False)
    #: The captures open now, by interface index (the chunk's interface table lists these).
    captures: dict[int, CaptureSource] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.chunker = Chunker(self.config.name, self.filters, self.config.chunk_bytes,
                               self.config.chunk_seconds, self.interface_table, 0)

    @property
    def sequence(self) -> int:
        """The sequence number of the last chunk cut."""
        return self.chunker.sequence

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    def decide(self, interface: Interface) -> Decision:
        """The sensor's decision for ``interface`` (include/exclude lists, then plugins)."""
        selector = InterfaceSelector(self.config.include_patterns, self.config.exclude_patterns,
                                     self.config.network_device)
        return decide(self.plugins, self.config, selector, interface)

    def kernel_filter(self) -> str:
        """``BPF`` AND-ed with every plugin's ``ossensor_kernel_filter``."""
        return kernel_filter(self.plugins, self.config)

    def open(self, interface: Interface | str = "fake0") -> CaptureSource:
        """Open a capture with the backend, as the sensor does on an ``added`` event."""
        if self.backend is None:
            raise CaptureError("no capture backend: pass backend= or load a capture plugin")
        if isinstance(interface, str):
            interface = fake_interface(interface)
        source = self.backend.open(interface, compile_filter(self.kernel_filter(),
                                                             interface.linktype or 1))
        self._added(source)
        return source

    def _added(self, source: CaptureSource) -> None:
        self.control.sources.append(source)
        self.captures[source.interface.index] = source
        self.hook.ossensor_interface_event(config=self.config,
                                           event=InterfaceEvent("added", source.interface))

    def interface_table(self) -> tuple[InterfaceCounters, ...]:
        """The chunk's interface table: every open capture's kernel counters now."""
        table = []
        for source in self.captures.values():
            try:
                stats = source.stats()
            except CaptureError:  # as the sensor does: no row without counters
                continue
            table.append(InterfaceCounters(source.interface.name, source.interface.index,
                                           source.linktype, stats.packets, stats.drops))
        return tuple(table)

    def filter(self, batch: PacketBatch) -> PacketBatch:
        """Every packet filter, in plugin order (stops at an empty batch, as the sensor does)."""
        return self.chunker.filter(batch)

    def _read_all(self, source: CaptureSource, idle_seconds: float,
                  timeout: float) -> list[PacketBatch]:
        kept: list[PacketBatch] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = source.read()
            if not batches:
                if isinstance(source, FakeCaptureSource) and source.exhausted:
                    break
                ready, _, _ = select.select([source.fileno()], [], [], idle_seconds)
                if not ready:
                    break
                continue
            kept += [b for b in map(self.chunker.filter, batches) if b.count]
        return kept

    def _close(self, source: CaptureSource) -> None:
        self.hook.ossensor_capture_stats(config=self.config, interface=source.interface.name,
                                         stats=source.stats())
        source.close()
        self.captures.pop(source.interface.index, None)
        self.hook.ossensor_interface_event(config=self.config,
                                           event=InterfaceEvent("removed", source.interface))

    def drain(self, source: CaptureSource, idle_seconds: float = 0.5,
              timeout: float = 30.0) -> list[PacketBatch]:
        """Read ``source`` until it stays idle for ``idle_seconds`` (a fake one: until it is
        exhausted); return the filtered, non-empty batches. Reports its counters, closes it."""
        kept = self._read_all(source, idle_seconds, timeout)
        self._close(source)
        return kept

    async def _send(self, chunk: Chunk) -> None:
        await self.transport.send(chunk)
        self.hook.ossensor_chunk_sent(config=self.config, chunk=chunk)

    async def send(self, batches: Sequence[PacketBatch]) -> Chunk:
        """Cut ``batches`` into one chunk and hand it to the transport."""
        chunk = self.chunker.chunk_of(batches)
        await self._send(chunk)
        return chunk

    async def run(self, sources: Iterable[CaptureSource]) -> list[Chunk]:
        """The whole lifecycle: start-up, each source drained through the chunker (a chunk
        cut by size or age as in the sensor, the rest when the source is drained), shutdown."""
        self.hook.ossensor_response_enforcer(config=self.config)
        self.hook.ossensor_startup(config=self.config, control=self.control)
        await self.transport.start(self.control)
        chunks: list[Chunk] = []
        try:
            for source in sources:
                if source not in self.control.sources:
                    self._added(source)
                cut: list[Chunk] = []
                for batch in self._read_all(source, 0.5, 30.0):
                    chunk = self.chunker.append(batch)
                    if chunk is None and self.chunker.seconds_left() <= 0:
                        chunk = self.chunker.cut()
                    if chunk is not None:
                        cut.append(chunk)
                last = self.chunker.cut()  # while the capture is open: it is in the table
                self._close(source)
                for chunk in [*cut, *([last] if last is not None else [])]:
                    await self._send(chunk)
                chunks += cut
                if last is not None:
                    chunks.append(last)
        finally:
            await self.transport.aclose()
            self.hook.ossensor_shutdown(config=self.config)
        return chunks

    def run_sync(self, sources: Iterable[CaptureSource]) -> list[Chunk]:
        """:meth:`run` from synchronous code."""
        return asyncio.run(self.run(sources))


def build_pipeline(plugins: Sequence[object], environ: Mapping[str, str] | None = None, *,
                   backend: CaptureBackend | None = None, transport: Transport | None = None,
                   trace: bool = False) -> Pipeline:
    """Register ``plugins`` (modules or objects with ``@hookimpl`` functions, in order) after
    the core's defaults, read the configuration from :data:`TEST_ENVIRONMENT` updated with
    ``environ``, and ask the hooks for the stages.

    The backend and transport are the plugins' (``ossensor_capture_backend``,
    ``ossensor_transport``) unless given; without either, a :class:`RecordingTransport`.
    Raises :class:`~ossensor_core.errors.ConfigError` listing every problem, as start-up does.
    """
    from ossensor_core.pipeline import defaults

    environment = {**TEST_ENVIRONMENT, **(environ or {})}
    config, problems = read_core_config(environment)
    manager = new_plugin_manager(trace or config.trace_hooks)
    loaded = LoadedPlugins(manager, [("core", "core")])
    manager.register(defaults, name="core")
    for plugin in plugins:
        name = manager.register(plugin)
        loaded.loaded.append(("plugin", name or repr(plugin)))
    hook = manager.hook
    config = dataclasses.replace(config, plugin_settings=plugin_settings(loaded, environment,
                                                                         problems))
    _configure(loaded, config, problems)
    if problems:
        raise ConfigError(problems)
    encoder = hook.ossensor_chunk_encoder(config=config)
    transport = transport or hook.ossensor_transport(config=config, encoder=encoder) \
        or RecordingTransport()
    backend = backend or hook.ossensor_capture_backend(config=config)
    # pluggy calls implementations last-registered first; the spec orders filters as the
    # plugins are listed (OSSENSOR_PLUGINS), so the results are reversed.
    filters = [f for f in reversed(hook.ossensor_packet_filter(config=config)) if f is not None]
    return Pipeline(config, loaded, filters, encoder, transport, backend)
