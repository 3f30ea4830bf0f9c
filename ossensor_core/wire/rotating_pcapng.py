"""Rotating pcapng files in one folder, written a chunk at a time, whole or not at all.

Shared by the file transport (``ossensor_plugins.transport_file``) and the vSensor's store
(``ossensor_vsensor.store``); each keeps its own concerns (locks, threads, error mapping).

One file per link type is open at a time (tcpdump 4.99 refuses a pcapng file whose interfaces
mix link types). A file is written as ``NAME.part`` (exclusive creation, mode ``FILE_MODE``)
and completed by size after a chunk, by age and on close: fsync, rename to ``NAME``, fsync the
folder, so a program that watches the folder only ever sees whole files under their final name.
Names sort by time::

    <prefix><UTC YYYYmmddTHHMMSSZ when opened>-<counter>-<link type>.pcapng

A chunk is written whole or not at all: when a write fails (disk full, folder removed), what
the chunk had added is cut off again with ``ftruncate``, files opened for it are removed, and
:class:`~ossensor_core.errors.StorageError` carries the errno.

Every method does blocking I/O and none is thread-safe: callers run them one at a time (in a
worker thread, under their own lock).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ossensor_core.errors import StorageError
from ossensor_core.wire.names import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW
from ossensor_core.wire.pcapng import PcapngWriter
from ossensor_core.wire.chunk import Chunk

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
FILE_MODE = 0o640  # captured payloads are sensitive: not world-readable

#: Short link type names used in file names (the ``LINKTYPE_*`` names, lower case).
LINKTYPE_NAMES = {LINKTYPE_ETHERNET: "ether", LINKTYPE_RAW: "raw", LINKTYPE_LINUX_SLL: "linux_sll",
                  228: "ipv4", 229: "ipv6"}


def linktype_name(linktype: int) -> str:
    """The short name of ``linktype`` in file names (``linktype<N>`` when it has none)."""
    return LINKTYPE_NAMES.get(linktype, f"linktype{linktype}")


def safe_name(name: str, fallback: str = "_", *, strip_trailing_dots: bool = False) -> str:
    """``name`` as one path component: no separators, nothing a shell would trip on, no
    leading dot (so no ``..`` and no hidden file); ``fallback`` when nothing is left.
    ``strip_trailing_dots`` removes trailing dots too."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    safe = safe.strip(".") if strip_trailing_dots else safe.lstrip(".")
    return safe or fallback


def part_path(final: Path) -> Path:
    """The ``.part`` name a file is written under before it is complete."""
    return final.with_name(final.name + PART_SUFFIX)


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
    used: int = 0  # when a chunk last wrote to it (a counter): the least recent is closed first

    @property
    def part(self) -> Path:
        return part_path(self.final)


@dataclass
class _Mark:
    """What an open file held before the current chunk, to cut the chunk off on failure."""

    file: _OpenFile
    new: bool
    position: int = 0
    packets: int = 0
    writer_state: tuple[dict[str, int], int, int] = field(default_factory=lambda: ({}, 0, 0))

    @classmethod
    def of(cls, opened: _OpenFile) -> _Mark:
        writer = opened.writer
        return cls(opened, new=False, position=opened.out.position, packets=writer.packets,
                   writer_state=(dict(writer.interfaces), writer.packets, writer.bytes_written))


class RotatingPcapngFiles:
    """The pcapng files written to ``directory``, one open file per link type.

    ``directory`` must exist (callers create it with the mode and the error handling they
    need). ``prefix`` starts every file name. A file is completed after the chunk that brings it
    to ``rotate_bytes`` (:meth:`complete_full`) and ``rotate_seconds`` after it was opened
    (:meth:`complete_aged`).

    After a failed chunk is cut off a file that held earlier chunks is completed (it is valid
    up to the cut), unless ``continue_after_failure``: then it stays open for the next chunk.
    A file the failed chunk cannot be cut off is closed and left as a ``.part`` file, or with
    ``continue_after_failure`` completed as it is.

    ``max_open`` bounds the open files (descriptors): before one more is opened, the least
    recently written file that the current chunk has not written is completed (a later chunk of
    its link type opens a new one). None: one per link type, without bound.

    ``packets_written`` and ``bytes_written`` (pcapng bytes) count stored chunks,
    ``files_completed`` the files renamed to their final name.
    """

    def __init__(self, directory: Path, prefix: str = "", rotate_bytes: int = 100 << 20,
                 rotate_seconds: float = 300.0, *, continue_after_failure: bool = False,
                 max_open: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_open = max_open
        self._uses = 0
        self.prefix = prefix
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.continue_after_failure = continue_after_failure
        self.packets_written = 0
        self.bytes_written = 0
        self.files_completed = 0
        self._files: dict[int, _OpenFile] = {}
        self._counter = 0

    # Writing -----------------------------------------------------------------------------

    def write_chunk(self, chunk: Chunk,
                    commit: Callable[[list[tuple[Path, int]]], None] | None = None) -> int:
        """Append every batch of ``chunk``; return the bytes added.

        ``commit``, when given, is called once everything is written with the ``.part`` path and
        end position of every open file (the vSensor journals them); an OSError from it cuts the
        chunk off again like a failed write.

        All or nothing: on an OSError what the chunk wrote is cut off again (see the class) and
        StorageError is raised, naming the ``.part`` file written (``path``, or the folder when
        none was) and carrying the errno. Files are not completed here: see
        :meth:`complete_full`.
        """
        marks: dict[int, _Mark] = {}
        path: Path | None = None
        try:
            for batch in chunk.batches:
                if not batch.count:
                    continue
                current = self._files.get(batch.linktype)
                if current is None:
                    self._make_room(marks)
                    final = self._next_name(batch.linktype)
                    path = part_path(final)
                    current = self._open_file(batch.linktype, final)
                    marks.setdefault(batch.linktype, _Mark(current, new=True))
                elif batch.linktype not in marks:
                    marks[batch.linktype] = _Mark.of(current)
                path = current.part
                self._uses += 1
                current.used = self._uses
                current.writer.write_batch(batch)
            if commit is not None:
                commit(self.positions())
        except OSError as exc:
            self._roll_back(marks.values())
            where = str(exc.filename or (path if path is not None else self.directory))
            reason = exc.strerror or str(exc)
            raise StorageError(f"cannot write {where!r}: {reason}", exc.errno, reason,
                               path) from exc
        except BaseException:
            self._roll_back(marks.values())
            raise
        added = 0
        for mark in marks.values():
            self.packets_written += mark.file.writer.packets - mark.packets
            added += mark.file.out.position - mark.position
        self.bytes_written += added
        return added

    def _make_room(self, busy: dict[int, _Mark]) -> None:
        """Complete least recently written files until one more may open (``max_open``); the
        files the current chunk wrote (``busy``) stay open."""
        if self.max_open is None:
            return
        while len(self._files) >= self.max_open:
            idle = [f for f in self._files.values() if f.linktype not in busy]
            if not idle:
                return
            self._complete_logged([min(idle, key=lambda f: f.used)])

    @property
    def open_files(self) -> int:
        """How many ``.part`` files are open now."""
        return len(self._files)

    def positions(self) -> list[tuple[Path, int]]:
        """(``.part`` path, bytes written) of every open file."""
        return [(f.part, f.out.position) for f in self._files.values()]

    def _next_name(self, linktype: int) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        while True:
            self._counter += 1
            final = self.directory / (f"{self.prefix}{stamp}-{self._counter:06d}-"
                                      f"{linktype_name(linktype)}.pcapng")
            # An earlier run in the same second must not be overwritten.
            if not final.exists() and not part_path(final).exists():
                return final

    def _open_file(self, linktype: int, final: Path) -> _OpenFile:
        part = part_path(final)
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
        """Cut off what the failed chunk wrote; files created for it are removed."""
        keep_open = self.continue_after_failure
        for mark in marks:
            opened = mark.file
            if mark.new or not keep_open:
                self._files.pop(opened.linktype, None)
            if mark.new:
                with contextlib.suppress(OSError):
                    os.close(opened.out.fd)
                with contextlib.suppress(OSError):
                    os.unlink(opened.part)
                continue
            try:
                os.ftruncate(opened.out.fd, mark.position)
                if keep_open:
                    os.lseek(opened.out.fd, mark.position, os.SEEK_SET)
            except OSError as exc:
                # The file is not trustworthy past the mark any more.
                log.error("cannot cut the failed chunk off %s (%s); %s", opened.part,
                          exc.strerror or exc,
                          "completed as it is" if keep_open else "left as it is")
                if keep_open:
                    self._complete_logged([opened])
                else:
                    with contextlib.suppress(OSError):
                        os.close(opened.out.fd)
                continue
            opened.out.position = mark.position
            opened.writer.interfaces, opened.writer.packets, opened.writer.bytes_written = \
                mark.writer_state
            if not keep_open:
                self._complete_logged([opened])

    # Completing --------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """time.monotonic() at which the oldest open file is due by age, or None."""
        opened = [f.opened for f in list(self._files.values())]  # a snapshot: may be in use
        return min(opened) + self.rotate_seconds if opened else None

    def complete_full(self) -> None:
        """Complete the files at or over ``rotate_bytes``; see :meth:`complete`."""
        self.complete([f for f in self._files.values() if f.out.position >= self.rotate_bytes])

    def complete_aged(self, now: float | None = None) -> None:
        """Complete the files opened ``rotate_seconds`` or more before ``now`` (monotonic)."""
        now = time.monotonic() if now is None else now
        self.complete([f for f in self._files.values() if now - f.opened >= self.rotate_seconds])

    def close(self) -> None:
        """Complete every open file; see :meth:`complete`."""
        self.complete(list(self._files.values()))

    def complete(self, files: Iterable[_OpenFile]) -> None:
        """Complete ``files``: each failure is logged; the first is raised (StorageError) after
        trying every one. A file that cannot be completed is closed and stays a ``.part``."""
        first: StorageError | None = None
        for opened in list(files):
            try:
                self._complete(opened)
            except StorageError as exc:
                log.error("%s", exc)
                first = first or exc
        if first is not None:
            raise first

    def _complete_logged(self, files: list[_OpenFile]) -> None:
        with contextlib.suppress(StorageError):  # logged by complete
            self.complete(files)

    def _complete(self, opened: _OpenFile) -> None:
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
            reason = exc.strerror or str(exc)
            raise StorageError(f"cannot complete {str(opened.part)!r}: {reason}; its "
                               f"{opened.writer.packets} packets stay in the .part file",
                               exc.errno, reason, opened.part) from exc
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:  # the file is complete; only the rename's durability is at stake
            log.warning("cannot fsync the folder %s: %s", self.directory, exc.strerror or exc)
        self.files_completed += 1
        log.info("wrote %s (%d packets, %d bytes)", opened.final, opened.writer.packets,
                 opened.out.position)
