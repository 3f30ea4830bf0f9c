"""The ``pcapfile`` capture backend: replay a pcap or pcapng file as if it were being captured.

A reader thread walks the file (:func:`read_packets`, standard library only), cuts the packets
into batches and queues them; a pipe tells the sensor's loop when a batch is ready, which is all
that :class:`~ossensor_core.plugin.CaptureSource` asks (``fileno`` polls readable while
``read`` has something). At the ``recorded`` pace a packet is handed over when its offset from
the first packet has elapsed; at ``fast`` as soon as the pipeline takes it (the queue is bounded,
so the file is never read into memory). Timestamps are the file's own.

When the file ends the source logs ``pcapfile: replayed N packets`` and goes quiet; closing it
stops the thread. Kernel filters cannot apply to a file: ``set_filter`` only records the program.
A file that cannot be read raises CaptureError naming it, from ``open`` (the header) or from
``read`` (a damaged packet further on).
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ossensor_core.plugin import (BpfProgram, CaptureError, CaptureStats, ConfigError, Interface,
                                  PacketBatch, SensorConfig, Setting, SettingsGroup, hookimpl)

# Under "ossensor": the sensor sends that logger (and its children) to OSSENSOR_LOGFILE_PATH.
log = logging.getLogger("ossensor.pcapfile")

PATH_VARIABLE = "OSSENSOR_PCAPFILE_PATH"
_PCAP_MAGICS = {0xA1B2C3D4: 1000, 0xA1B23C4D: 1}  # nanoseconds per fraction unit
_PCAPNG_SHB = 0x0A0D0D0A
_QUEUE_BATCHES = 16


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("pcapfile", [
        Setting("path", str, "", "The pcap or pcapng file to replay.", env=PATH_VARIABLE),
        Setting("pace", str, "fast", "recorded: at the file's own timing; fast: as fast as "
                "the pipeline takes packets.", choices=("recorded", "fast")),
        Setting("batch_packets", int, 256, "Most packets in one batch.", minimum=1),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    if config.capture_backend != "pcapfile":
        return
    path = config.plugin("pcapfile").path
    if not path:
        raise ConfigError([f"{PATH_VARIABLE}: is not set; the pcapfile backend needs a file"])
    try:
        with open(path, "rb") as handle:
            _linktype_and_packets(handle, path)
    except (OSError, CaptureError) as exc:
        raise ConfigError([f"{PATH_VARIABLE}: {exc}"]) from exc


@hookimpl
def ossensor_capture_backend(config: SensorConfig) -> PcapFileBackend:
    settings = config.plugin("pcapfile")
    return PcapFileBackend(Path(settings.path), settings.pace == "recorded",
                           settings.batch_packets)


# -- reading files ------------------------------------------------------------------------------

Frame = tuple[int, int, bytes]  # timestamp_ns, wire length, frame


def read_packets(handle: BinaryIO, name: str = "") -> tuple[int, Iterator[Frame]]:
    """The link type of a pcap or pcapng file and an iterator over its packets."""
    return _linktype_and_packets(handle, name or getattr(handle, "name", "file"))


def _exact(handle: BinaryIO, size: int, name: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise CaptureError(f"{name}: the file ends inside a record")
    return data


def _linktype_and_packets(handle: BinaryIO, name: str) -> tuple[int, Iterator[Frame]]:
    head = handle.read(24)
    if len(head) < 24:
        raise CaptureError(f"{name}: too short to be a pcap or pcapng file")
    for order in "<>":
        magic = struct.unpack(order + "I", head[:4])[0]
        if magic in _PCAP_MAGICS:
            linktype = struct.unpack(order + "I", head[20:24])[0] & 0xFFFF
            return linktype, _pcap(handle, order, _PCAP_MAGICS[magic], name)
    if struct.unpack("<I", head[:4])[0] == _PCAPNG_SHB:
        order = "<" if head[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        handle.seek(0)
        blocks = _pcapng(handle, order, name)
        first = next(blocks, None)
        if first is None:
            raise CaptureError(f"{name}: a pcapng file without an interface")
        linktype = first[0]

        def packets() -> Iterator[Frame]:
            for block_linktype, frame in blocks:
                if block_linktype != linktype:
                    raise CaptureError(f"{name}: mixes link types {linktype} and "
                                       f"{block_linktype}; replay one link type per file")
                if frame is not None:
                    yield frame
        return linktype, packets()
    raise CaptureError(f"{name}: not a pcap or pcapng file")


def _pcap(handle: BinaryIO, order: str, unit_ns: int, name: str) -> Iterator[Frame]:
    record = struct.Struct(order + "IIII")
    while head := handle.read(16):
        if len(head) < 16:
            raise CaptureError(f"{name}: the file ends inside a record")
        sec, fraction, caplen, wirelen = record.unpack(head)
        yield sec * 1_000_000_000 + fraction * unit_ns, wirelen, _exact(handle, caplen, name)


def _pcapng(handle: BinaryIO, order: str,
            name: str) -> Iterator[tuple[int, Frame | None]]:
    """``(linktype, packet)`` per Enhanced/Simple Packet Block, and ``(linktype, None)`` once
    per Interface Description Block (so the caller learns the link type first)."""
    interfaces: list[tuple[int, int]] = []  # (linktype, units per second)
    while head := handle.read(8):
        if len(head) < 8:
            raise CaptureError(f"{name}: the file ends inside a block")
        block_type, length = struct.unpack(order + "II", head)
        if length < 12 or length % 4:
            raise CaptureError(f"{name}: a block of impossible length {length}")
        body = _exact(handle, length - 8, name)[:-4]
        if block_type == _PCAPNG_SHB:
            order = "<" if body[:4] == b"\x4d\x3c\x2b\x1a" else ">"
            interfaces = []
        elif block_type == 1:  # Interface Description Block
            linktype = struct.unpack_from(order + "H", body)[0]
            interfaces.append((linktype, _resolution(body[8:], order)))
            yield linktype, None
        elif block_type == 6:  # Enhanced Packet Block
            interface, high, low, caplen, wirelen = struct.unpack_from(order + "IIIII", body)
            linktype, units = interfaces[interface]
            stamp = ((high << 32) | low) * 1_000_000_000 // units
            yield linktype, (stamp, wirelen, body[20:20 + caplen])
        elif block_type == 3:  # Simple Packet Block: no timestamp, whole packet
            wirelen = struct.unpack_from(order + "I", body)[0]
            yield interfaces[0][0], (0, wirelen, body[4:4 + min(wirelen, len(body) - 4)])


def _resolution(options: bytes, order: str) -> int:
    """Units per second from ``if_tsresol`` (default microseconds)."""
    at = 0
    while at + 4 <= len(options):
        code, size = struct.unpack_from(order + "HH", options, at)
        if code == 0:
            break
        if code == 9 and size >= 1:
            value = options[at + 4]
            return 2 ** (value & 0x7F) if value & 0x80 else 10 ** value
        at += 4 + size + (-size % 4)
    return 1_000_000


# -- the backend and its sources ----------------------------------------------------------------

class PcapFileBackend:
    """Opens a :class:`PcapFileSource` per interface; each replays the whole file."""

    name = "pcapfile"

    def __init__(self, path: Path, recorded_pace: bool = False, batch_packets: int = 256) -> None:
        self.path = path
        self.recorded_pace = recorded_pace
        self.batch_packets = batch_packets

    def open(self, interface: Interface, program: BpfProgram) -> PcapFileSource:
        source = PcapFileSource(self.path, interface, self.recorded_pace, self.batch_packets)
        source.set_filter(program)
        return source


class PcapFileSource:
    """One replay of the file, labelled as captured on ``interface``."""

    flush_seconds = 0.05

    def __init__(self, path: Path, interface: Interface, recorded_pace: bool = False,
                 batch_packets: int = 256) -> None:
        self.path = path
        self.interface = interface
        self.recorded_pace = recorded_pace
        self.batch_packets = batch_packets
        try:
            self._handle = open(path, "rb")
            self.linktype, self._packets = read_packets(self._handle, str(path))
        except OSError as exc:
            raise CaptureError(f"pcapfile: cannot open {str(path)!r}: {exc.strerror}") from exc
        except CaptureError:
            self._handle.close()
            raise
        self.programs: list[BpfProgram] = []
        self.delivered = 0
        self.done = False
        self._queue: queue.Queue[PacketBatch | CaptureError] = queue.Queue(_QUEUE_BATCHES)
        self._stop = threading.Event()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._closed = False
        self._thread = threading.Thread(target=self._replay, name=f"pcapfile-{interface.name}",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: PacketBatch | CaptureError) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            os.write(self._write_fd, b"\1")
            return True
        return False

    def _replay(self) -> None:
        started = time.monotonic()
        first_ns: int | None = None
        pending: list[Frame] = []
        count = 0
        name, index = self.interface.name, self.interface.index
        try:
            for frame in self._packets:
                if self.recorded_pace:
                    first_ns = frame[0] if first_ns is None else first_ns
                    wait = (frame[0] - first_ns) / 1e9 - (time.monotonic() - started)
                    if wait > 0.005 and pending:  # hand over what is due before sleeping
                        if not self._put(PacketBatch.from_frames(name, index, self.linktype,
                                                                 pending)):
                            return
                        pending = []
                    if wait > 0 and self._stop.wait(wait):
                        return
                pending.append(frame)
                count += 1
                if len(pending) >= self.batch_packets:
                    if not self._put(PacketBatch.from_frames(name, index, self.linktype,
                                                             pending)):
                        return
                    pending = []
            if pending and not self._put(PacketBatch.from_frames(name, index, self.linktype,
                                                                 pending)):
                return
            log.info("pcapfile: replayed %d packets from %s on %s", count, self.path, name)
        except CaptureError as exc:
            self._put(exc)
        except OSError as exc:
            self._put(CaptureError(f"pcapfile: reading {str(self.path)!r}: {exc}"))
        finally:
            self.done = True

    def fileno(self) -> int:
        return self._read_fd

    def read(self) -> list[PacketBatch]:
        if self._closed:
            raise CaptureError(f"pcapfile: the replay on {self.interface.name} is closed")
        try:  # empty the pipe first: a batch queued after this wakes the loop again
            os.read(self._read_fd, 4096)
        except BlockingIOError:
            pass
        batches = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, CaptureError):
                raise item
            batches.append(item)
            self.delivered += item.count
        return batches

    def set_filter(self, program: BpfProgram) -> None:
        self.programs.append(program)

    def stats(self) -> CaptureStats:
        return CaptureStats(self.delivered, 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=5)
        self._handle.close()
        os.close(self._read_fd)
        os.close(self._write_fd)
