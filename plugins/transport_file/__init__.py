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

The files themselves (names, ``.part`` handling, rotation, cutting a failed chunk off) are
:class:`ossensor_core.wire.rotating_pcapng.RotatingPcapngFiles`, shared with the vSensor's store.

Settings: ``OSSENSOR_OUTPUT_DIR`` (required with ``OSSENSOR_TRANSPORT=file``),
``OSSENSOR_FILE_ROTATE_BYTES`` and ``OSSENSOR_FILE_ROTATE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.errors import ConfigError, StorageError, TransportError
from ossensor_core.wire.rotating_pcapng import PART_SUFFIX, RotatingPcapngFiles, safe_name
from ossensor_core.plugin import hookimpl
from ossensor_core.pipeline.contracts import Chunk, ChunkEncoder, SensorControl, Transport
from ossensor_core.pipeline.settings import Setting, SettingsGroup

log = logging.getLogger(__name__)

OUTPUT_DIR_VARIABLE = "OSSENSOR_OUTPUT_DIR"


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("file", [
        Setting("output_dir", str, "",
                "Folder the file transport writes pcapng files to (created if missing).",
                env=OUTPUT_DIR_VARIABLE),
        Setting("rotate_bytes", int, 100 << 20,
                "Start a new file once the current one reaches this size (a file may exceed it "
                "by the last chunk written to it).", minimum=4096, maximum=1 << 40),
        Setting("rotate_seconds", float, 300,
                "Complete a file this many seconds after it was opened, even when idle.",
                positive=True, maximum=7 * 86400),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    """Refuse to start without a folder we can write, before any capture opens."""
    if config.transport != "file" or config.plugin("file").refused("output_dir"):
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


class FileTransport(Transport):
    """Writes chunks to rotated pcapng files, one link type per file.

    The files are :class:`~ossensor_core.wire.rotating_pcapng.RotatingPcapngFiles`; this class adds the
    asyncio side and maps StorageError onto TransportError. Writing runs in a worker thread
    (``asyncio.to_thread``) so that an fsync on rotation never stalls the event loop that reads
    the captures; an asyncio lock keeps chunks in order. ``packets_written``, ``bytes_written``
    (pcapng bytes) and ``files_written`` (files completed) are for the caller's logs.
    """

    name = "file"

    def __init__(self, directory: Path, sensor: str, rotate_bytes: int = 100 << 20,
                 rotate_seconds: float = 300.0) -> None:
        self.directory = Path(directory)
        self.sensor = safe_name(sensor, "ossensor", strip_trailing_dots=True)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self._files = RotatingPcapngFiles(self.directory, f"{self.sensor}-", rotate_bytes,
                                          rotate_seconds)
        self._lock = asyncio.Lock()  # order of chunks
        self._thread_lock = threading.Lock()  # a cancelled send's write may still be running
        self._timer: asyncio.Task[None] | None = None
        self._background_error: TransportError | None = None
        self._closed = False

    @property
    def packets_written(self) -> int:
        return self._files.packets_written

    @property
    def bytes_written(self) -> int:
        return self._files.bytes_written

    @property
    def files_written(self) -> int:
        return self._files.files_completed

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
            self._finish_quietly(self._files.complete_aged)
            try:
                self._files.write_chunk(chunk)
            except StorageError as exc:
                raise TransportError(f"{exc}; chunk {chunk.sequence} ({chunk.packets} packets) "
                                     "was not stored") from exc
            self._finish_quietly(self._files.complete_full)

    def _finish_quietly(self, complete: Callable[[], None]) -> None:
        """Complete files on rotation. A failure there is not this chunk's (it is written, or
        about to be, in a new file): it is logged now and raised again by ``aclose``."""
        try:
            complete()
        except StorageError as exc:
            if self._background_error is None:
                error = TransportError(str(exc))
                error.__cause__ = exc
                self._background_error = error

    async def _rotate_by_age(self) -> None:
        """Complete files by age even when no chunk arrives to notice it."""
        while True:
            due = self._files.next_due()  # a worker thread may be opening a file right now
            delay = (due - time.monotonic()) if due is not None else self.rotate_seconds
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
            try:
                self._files.close()
            except StorageError as exc:
                raise TransportError(str(exc)) from exc

    def _finish_aged(self) -> None:
        with self._thread_lock:
            self._finish_quietly(self._files.complete_aged)
