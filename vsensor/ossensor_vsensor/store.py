"""Storing chunks as rotating pcapng files: ``DATA_DIR/<sensor>/<name>.pcapng``.

One file per link type is open per sensor (tcpdump 4.99 refuses a pcapng file that mixes link
types). A file is written as ``NAME.pcapng.part`` and renamed once complete: by size after a
chunk, by age (a timer in the application calls :meth:`SensorStore.finish_aged`) and on
shutdown. Names sort by time::

    <UTC YYYYmmddTHHMMSSZ when opened>-<counter>-<link type>.pcapng

A chunk is stored whole or not at all: on an OSError (disk full, folder unwritable) every file
is cut back to its size before the chunk, files opened for it are removed, and
:class:`StoreError` carries the errno so the caller can answer 507.

Methods of :class:`SensorStore` do blocking I/O; the application calls them in a worker
thread, one at a time per sensor (an asyncio lock per sensor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ossensor_core.pcapng import PcapngWriter
from ossensor_core.protocols import Chunk

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
FILE_MODE = 0o640  # captured payloads are sensitive: not world-readable
DIR_MODE = 0o750
#: How many stored chunk sequences are remembered per sensor to recognise a retry. A retry comes
#: seconds after the original, so a bounded window is enough; the memory is lost on restart.
SEQUENCE_MEMORY = 65536

LINKTYPE_NAMES = {1: "ether", 101: "raw", 113: "linux_sll", 228: "ipv4", 229: "ipv6"}


class StoreError(Exception):
    """A chunk could not be stored; nothing of it was kept. ``errno`` is the OSError's."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def safe_name(sensor: str) -> str:
    """The sensor name as one path component: no separators, no leading dot (so no ``..``,
    and no clash with the vSensor's own ``.tls`` folder)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sensor).lstrip(".") or "_"


def linktype_name(linktype: int) -> str:
    return LINKTYPE_NAMES.get(linktype, f"linktype{linktype}")


class _Descriptor:
    """Unbuffered writes to a descriptor, so ``position`` is exactly what is on disk and a
    failed chunk can be cut off with ``ftruncate``."""

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
    linktype: int
    final: Path
    out: _Descriptor
    writer: PcapngWriter
    opened: float  # time.monotonic()

    @property
    def part(self) -> Path:
        return self.final.with_name(self.final.name + PART_SUFFIX)


@dataclass
class _Mark:
    """What an open file held before the current chunk."""

    file: _OpenFile
    new: bool
    position: int = 0
    writer_state: tuple[dict[str, int], int, int] = field(default_factory=lambda: ({}, 0, 0))


class SensorStore:
    """The pcapng files of one sensor, and the chunk sequences already stored."""

    def __init__(self, data_dir: Path, sensor: str, rotate_bytes: int,
                 rotate_seconds: float) -> None:
        self.sensor = sensor
        self.directory = Path(data_dir) / safe_name(sensor)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.files_completed = 0
        self._files: dict[int, _OpenFile] = {}
        self._counter = 0
        self._sequences: OrderedDict[int, None] = OrderedDict()

    # Sequences ---------------------------------------------------------------------------

    def seen(self, sequence: int) -> bool:
        return sequence in self._sequences

    def remember(self, sequence: int) -> None:
        self._sequences[sequence] = None
        self._sequences.move_to_end(sequence)
        while len(self._sequences) > SEQUENCE_MEMORY:
            self._sequences.popitem(last=False)

    # Writing -----------------------------------------------------------------------------

    def write_chunk(self, chunk: Chunk) -> int:
        """Append every batch of ``chunk``; return the bytes added. Raises StoreError."""
        marks: dict[int, _Mark] = {}
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for batch in chunk.batches:
                if not batch.count:
                    continue
                current = self._files.get(batch.linktype)
                if current is None:
                    current = self._open_file(batch.linktype)
                    marks.setdefault(batch.linktype, _Mark(current, new=True))
                elif batch.linktype not in marks:
                    writer = current.writer
                    marks[batch.linktype] = _Mark(
                        current, new=False, position=current.out.position,
                        writer_state=(dict(writer.interfaces), writer.packets,
                                      writer.bytes_written))
                current.writer.write_batch(batch)
        except OSError as exc:
            self._roll_back(marks.values())
            raise StoreError(f"cannot store chunk {chunk.sequence} of {self.sensor!r} in "
                             f"{str(self.directory)!r}: {exc.strerror or exc}",
                             exc.errno) from exc
        except BaseException:
            self._roll_back(marks.values())
            raise
        added = sum(m.file.out.position - m.position for m in marks.values())
        self._finish_quietly([m.file for m in marks.values()
                              if m.file.out.position >= self.rotate_bytes])
        return added

    def finish_aged(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._finish_quietly([f for f in self._files.values()
                              if now - f.opened >= self.rotate_seconds])

    def next_due(self) -> float | None:
        """time.monotonic() at which the oldest open file is due, or None."""
        opened = [f.opened for f in list(self._files.values())]
        return min(opened) + self.rotate_seconds if opened else None

    def close(self) -> None:
        """Complete every open file (rename the ``.part`` files)."""
        self._finish_quietly(list(self._files.values()))

    def _open_file(self, linktype: int) -> _OpenFile:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            self._counter += 1
            final = self.directory / f"{stamp}-{self._counter:06d}-{linktype_name(linktype)}.pcapng"
            part = final.with_name(final.name + PART_SUFFIX)
            if final.exists() or part.exists():  # an earlier run in the same second
                continue
            break
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

    def _roll_back(self, marks) -> None:
        for mark in marks:
            opened = mark.file
            if mark.new:
                self._files.pop(opened.linktype, None)
                with contextlib.suppress(OSError):
                    os.close(opened.out.fd)
                with contextlib.suppress(OSError):
                    os.unlink(opened.part)
                continue
            try:
                os.ftruncate(opened.out.fd, mark.position)
                os.lseek(opened.out.fd, mark.position, os.SEEK_SET)
            except OSError as exc:
                # The file is not trustworthy past the mark any more: complete it as it is.
                log.error("cannot cut a failed chunk off %s (%s)", opened.part,
                          exc.strerror or exc)
                self._finish_quietly([opened])
                continue
            opened.out.position = mark.position
            (opened.writer.interfaces, opened.writer.packets,
             opened.writer.bytes_written) = mark.writer_state

    def _finish_quietly(self, files: list[_OpenFile]) -> None:
        for opened in files:
            self._files.pop(opened.linktype, None)
            try:
                try:
                    os.fsync(opened.out.fd)
                finally:
                    os.close(opened.out.fd)
                os.replace(opened.part, opened.final)
            except OSError as exc:
                log.error("cannot complete %s: %s; its packets stay in the .part file",
                          opened.part, exc.strerror or exc)
                continue
            self.files_completed += 1
            log.info("wrote %s (%d packets, %d bytes)", opened.final, opened.writer.packets,
                     opened.out.position)


def enforce_retention(data_dir: Path, retain_seconds: float | None = None,
                      retain_bytes: int | None = None,
                      now: float | None = None) -> list[Path]:
    """Delete completed pcapng files under ``data_dir/<sensor>/``; return what was deleted.

    ``retain_seconds``: files last written more than this long ago go. ``retain_bytes``: the
    completed files of all sensors together stay at or under this size, the oldest (by
    modification time) going first. A ``.part`` file is never touched: it is being written,
    and its packets are not complete anywhere else. Files that vanish meanwhile are skipped.
    """
    if retain_seconds is None and retain_bytes is None:
        return []
    now = time.time() if now is None else now
    files: list[tuple[float, str, int, Path]] = []
    try:
        folders = [f for f in Path(data_dir).iterdir()
                   if not f.name.startswith(".") and f.is_dir()]  # not DATA_DIR/.tls
    except OSError as exc:
        log.error("retention: cannot list %s: %s", data_dir, exc.strerror or exc)
        return []
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.endswith(".pcapng") or not entry.is_file(
                            follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    files.append((stat.st_mtime, entry.path, stat.st_size, Path(entry.path)))
        except OSError as exc:
            log.error("retention: cannot list %s: %s", folder, exc.strerror or exc)
    files.sort()
    doomed: list[tuple[Path, int, str]] = []
    keep: list[tuple[float, str, int, Path]] = []
    for mtime, _, size, path in files:
        if retain_seconds is not None and now - mtime > retain_seconds:
            doomed.append((path, size, f"older than {retain_seconds:g} s"))
        else:
            keep.append((mtime, _, size, path))
    if retain_bytes is not None:
        total = sum(size for _, _, size, _ in keep)
        for _, _, size, path in keep:
            if total <= retain_bytes:
                break
            doomed.append((path, size, f"completed files over {retain_bytes} bytes"))
            total -= size
    deleted: list[Path] = []
    for path, size, why in doomed:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("retention: cannot delete %s: %s", path, exc.strerror or exc)
            continue
        deleted.append(path)
        log.info("retention: deleted %s (%d bytes, %s)", path, size, why)
    return deleted
