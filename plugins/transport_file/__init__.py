"""The file transport: chunks stored as pcapng files that tcpdump, tshark and Wireshark read.

Each file holds one link type (tcpdump 4.99 refuses a pcapng file whose interfaces mix link
types), so one file per link type is open at a time. A file is written as ``NAME.part`` and
renamed to ``NAME`` once complete (rotated by size or age, or at shutdown), after an fsync: a
program that watches the folder only ever sees whole files under their final name. Names sort
by time::

    <sensor>-<UTC YYYYmmddTHHMMSSZ when opened>-<counter>-<link type>.pcapng

A chunk is written whole or not at all: when a write fails (disk full, folder removed), what
this chunk had added is cut off again, the files stay valid pcapng, and ``send`` raises
TransportError naming the file and the cause, so the caller knows the chunk was not kept.

Settings: ``OSSENSOR_OUTPUT_DIR`` (required with ``OSSENSOR_TRANSPORT=file``),
``OSSENSOR_FILE_ROTATE_BYTES`` and ``OSSENSOR_FILE_ROTATE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ossensor_core.config import SensorConfig
from ossensor_core.errors import ConfigError, TransportError
from ossensor_core.pcapng import PcapngWriter
from ossensor_core.plugin import hookimpl
from ossensor_core.protocols import SensorControl, Chunk, ChunkEncoder
from ossensor_core.settings import Setting, SettingsGroup

log = logging.getLogger(__name__)

OUTPUT_DIR_VARIABLE = "OSSENSOR_OUTPUT_DIR"
PART_SUFFIX = ".part"
FILE_MODE = 0o640  # captured payloads are sensitive: not world-readable

#: Short link type names used in file names (the ``LINKTYPE_*`` names, lower case).
LINKTYPE_NAMES = {1: "ether", 101: "raw", 113: "linux_sll", 228: "ipv4", 229: "ipv6"}


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("file", [
        Setting("output_dir", str, "",
                "Folder the file transport writes pcapng files to (created if missing).",
                env=OUTPUT_DIR_VARIABLE),
        Setting("rotate_bytes", int, 100 << 20,
                "Start a new file once the current one reaches this size (a file may exceed it "
                "by the last chunk written to it).", minimum=4096),
        Setting("rotate_seconds", float, 300,
                "Complete a file this many seconds after it was opened, even when idle.",
                positive=True),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    """Refuse to start without a folder we can write, before any capture opens."""
    if config.transport != "file":
        return
    problem = check_output_dir(config.plugin("file").output_dir)
    if problem:
        raise ConfigError([f"{OUTPUT_DIR_VARIABLE}: {problem}"])


@hookimpl
def ossensor_transport(config: SensorConfig, encoder: ChunkEncoder) -> FileTransport:
    # The encoder is for transports that ship chunks; files hold pcapng, not encoded chunks.
    settings = config.plugin("file")
    if not settings.output_dir:
        raise ConfigError([f"{OUTPUT_DIR_VARIABLE}: is not set; the file transport needs a "
                           "folder to write pcapng files to"])
    return FileTransport(Path(settings.output_dir), config.name,
                         rotate_bytes=settings.rotate_bytes,
                         rotate_seconds=settings.rotate_seconds)


def check_output_dir(directory: str) -> str | None:
    """Create ``directory`` if needed and prove we can create files in it; return the problem."""
    if not directory:
        return "is not set; the file transport needs a folder to write pcapng files to"
    path = Path(directory)
    if path.exists() and not path.is_dir():
        return f"{directory!r} exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {directory!r} ({exc.strerror or exc})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".ossensor-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write to the folder {directory!r} ({exc.strerror or exc})"
    return None


def linktype_name(linktype: int) -> str:
    return LINKTYPE_NAMES.get(linktype, f"linktype{linktype}")


def _safe_name(name: str) -> str:
    """The sensor name as a file name part: no separators, nothing a shell would trip on."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "ossensor"


class _Descriptor:
    """The binary file that PcapngWriter writes to: whole writes straight to a descriptor.

    No user-space buffer, so the bytes on disk are exactly those counted in ``position`` and a
    failed chunk can be cut off with ``ftruncate``. The writer hands over one buffer per batch.
    """

    __slots__ = ("fd", "position")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.position += len(data)
        return len(data)


@dataclass
class _OpenFile:
    """A ``.part`` file being written."""

    linktype: int
    final: Path
    out: _Descriptor
    writer: PcapngWriter
    opened: float  # time.monotonic()
    packets: int = 0

    @property
    def part(self) -> Path:
        return self.final.with_name(self.final.name + PART_SUFFIX)


@dataclass
class _Mark:
    """What an open file held before the current chunk, to cut the chunk off on failure."""

    file: _OpenFile
    new: bool
    position: int = 0
    packets: int = 0
    writer_state: tuple[dict[str, int], int, int] = field(default_factory=lambda: ({}, 0, 0))


class FileTransport:
    """Writes chunks to rotated pcapng files, one link type per file.

    Writing runs in a worker thread (``asyncio.to_thread``) so that an fsync on rotation never
    stalls the event loop that reads the captures; an asyncio lock keeps chunks in order.
    ``packets_written``, ``bytes_written`` (pcapng bytes) and ``files_written`` (files completed)
    are for the caller's logs.
    """

    name = "file"

    def __init__(self, directory: Path, sensor: str, rotate_bytes: int = 100 << 20,
                 rotate_seconds: float = 300.0) -> None:
        self.directory = Path(directory)
        self.sensor = _safe_name(sensor)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.packets_written = 0
        self.bytes_written = 0
        self.files_written = 0
        self._files: dict[int, _OpenFile] = {}
        self._counter = 0
        self._lock = asyncio.Lock()  # order of chunks
        self._thread_lock = threading.Lock()  # a cancelled send's write may still be running
        self._timer: asyncio.Task[None] | None = None
        self._background_error: TransportError | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"FileTransport({str(self.directory)!r}, files={self.files_written}, "
                f"packets={self.packets_written})")

    async def start(self, control: SensorControl | None = None) -> None:
        await asyncio.to_thread(self._prepare_directory)
        self._timer = asyncio.create_task(self._rotate_by_age(), name="file transport rotation")

    async def send(self, chunk: Chunk) -> None:
        if self._closed:
            raise TransportError("the file transport is closed")
        async with self._lock:
            await asyncio.to_thread(self._write_chunk, chunk)

    async def aclose(self) -> None:
        """Complete every open file; raise the first failure (after trying them all)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        async with self._lock:
            await asyncio.to_thread(self._finish_all)
        if self._background_error is not None:
            raise self._background_error

    # The rest runs in a worker thread, under _thread_lock.

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create the output folder {str(self.directory)!r}: "
                                 f"{exc.strerror or exc}") from exc
        leftovers = list(self.directory.glob(f"{self.sensor}-*.pcapng{PART_SUFFIX}"))
        if leftovers:
            log.warning("%d unfinished %s files in %s from an earlier run (left as they are)",
                        len(leftovers), PART_SUFFIX, self.directory)

    def _write_chunk(self, chunk: Chunk) -> None:
        with self._thread_lock:
            self._finish_quietly(self._aged_files())
            marks: dict[int, _Mark] = {}
            target: Path | None = None
            try:
                for batch in chunk.batches:
                    if not batch.count:
                        continue
                    current = self._files.get(batch.linktype)
                    if current is None:
                        target = self._next_name(batch.linktype)
                        current = self._open_file(batch.linktype, target)
                        marks.setdefault(batch.linktype, _Mark(current, new=True))
                    elif batch.linktype not in marks:
                        writer = current.writer
                        marks[batch.linktype] = _Mark(
                            current, new=False, position=current.out.position,
                            packets=current.packets,
                            writer_state=(dict(writer.interfaces), writer.packets,
                                          writer.bytes_written))
                    target = current.final
                    current.packets += current.writer.write_batch(batch)
            except OSError as exc:
                self._roll_back(marks.values())
                where = str(target.with_name(target.name + PART_SUFFIX)) if target else \
                    str(self.directory)
                raise TransportError(f"cannot write {where!r}: {exc.strerror or exc}; chunk "
                                     f"{chunk.sequence} ({chunk.packets} packets) was not "
                                     "stored") from exc
            except BaseException:
                self._roll_back(marks.values())
                raise
            for mark in marks.values():
                self.packets_written += mark.file.packets - mark.packets
                self.bytes_written += mark.file.out.position - mark.position
            self._finish_quietly([m.file for m in marks.values()
                                  if m.file.out.position >= self.rotate_bytes])

    def _finish_quietly(self, files: list[_OpenFile]) -> None:
        """Complete files on rotation. A failure there is not this chunk's (it is written, or
        about to be, in a new file): it is logged now and raised again by ``aclose``."""
        try:
            self._finish_files(files)
        except TransportError as exc:
            self._background_error = self._background_error or exc

    def _next_name(self, linktype: int) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            self._counter += 1
            final = self.directory / (f"{self.sensor}-{stamp}-{self._counter:06d}-"
                                      f"{linktype_name(linktype)}.pcapng")
            # Another run of the same sensor in the same second must not be overwritten.
            if not final.exists() and not final.with_name(final.name + PART_SUFFIX).exists():
                return final

    def _open_file(self, linktype: int, final: Path) -> _OpenFile:
        part = final.with_name(final.name + PART_SUFFIX)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        out = _Descriptor(fd)
        try:
            writer = PcapngWriter(out, linktype)  # writes the section header
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        opened = _OpenFile(linktype, final, out, writer, time.monotonic())
        self._files[linktype] = opened
        return opened

    def _roll_back(self, marks: Iterable[_Mark]) -> None:
        """Cut off what the failed chunk wrote; files created for it are removed, files that
        held earlier chunks are completed (they are valid up to the cut)."""
        for mark in marks:
            opened = mark.file
            self._files.pop(opened.linktype, None)
            if mark.new:
                with contextlib.suppress(OSError):
                    os.close(opened.out.fd)
                with contextlib.suppress(OSError):
                    os.unlink(opened.part)
                continue
            try:
                os.ftruncate(opened.out.fd, mark.position)
            except OSError as exc:
                log.error("cannot cut the failed chunk off %s (%s); left as it is",
                          opened.part, exc.strerror or exc)
                with contextlib.suppress(OSError):
                    os.close(opened.out.fd)
                continue
            opened.out.position, opened.packets = mark.position, mark.packets
            opened.writer.interfaces, opened.writer.packets, opened.writer.bytes_written = \
                mark.writer_state
            try:
                self._finish(opened)
            except TransportError as exc:
                log.error("%s", exc)

    def _aged_files(self) -> list[_OpenFile]:
        now = time.monotonic()
        return [f for f in self._files.values() if now - f.opened >= self.rotate_seconds]

    def _finish_files(self, files: list[_OpenFile]) -> None:
        """Complete ``files``; raise the first failure after trying every one."""
        first: TransportError | None = None
        for opened in files:
            try:
                self._finish(opened)
            except TransportError as exc:
                log.error("%s", exc)
                first = first or exc
        if first is not None:
            raise first

    def _finish(self, opened: _OpenFile) -> None:
        """fsync, close and rename one file to its final name (then fsync the folder, so that
        the rename survives a crash too)."""
        self._files.pop(opened.linktype, None)
        try:
            try:
                os.fsync(opened.out.fd)
            finally:
                os.close(opened.out.fd)
            os.replace(opened.part, opened.final)
        except OSError as exc:
            raise TransportError(f"cannot complete {str(opened.part)!r}: {exc.strerror or exc}; "
                                 f"its {opened.packets} packets stay in the .part file") from exc
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:  # the file is complete; only the rename's durability is at stake
            log.warning("cannot fsync the folder %s: %s", self.directory, exc.strerror or exc)
        self.files_written += 1
        log.info("wrote %s (%d packets, %d bytes)", opened.final, opened.packets,
                 opened.out.position)

    async def _rotate_by_age(self) -> None:
        """Complete files by age even when no chunk arrives to notice it."""
        while True:
            now = time.monotonic()
            # A snapshot: a worker thread may be opening a file right now.
            due = [f.opened + self.rotate_seconds for f in list(self._files.values())]
            delay = (min(due) - now) if due else self.rotate_seconds
            await asyncio.sleep(min(max(delay, 0.01), 3600.0))
            async with self._lock:
                try:
                    await asyncio.to_thread(self._finish_aged)
                except Exception as exc:  # keep rotating; aclose reports it
                    log.exception("file rotation failed")
                    if self._background_error is None:
                        error = TransportError(f"file rotation failed: {exc}")
                        error.__cause__ = exc
                        self._background_error = error

    def _finish_all(self) -> None:
        with self._thread_lock:
            self._finish_files(list(self._files.values()))

    def _finish_aged(self) -> None:
        with self._thread_lock:
            self._finish_quietly(self._aged_files())
