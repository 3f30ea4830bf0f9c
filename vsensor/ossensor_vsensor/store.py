"""Storing chunks as rotating pcapng files: ``DATA_DIR/<sensor>/<name>.pcapng``.

One file per link type is open per sensor (tcpdump 4.99 refuses a pcapng file that mixes link
types). A file is written as ``NAME.pcapng.part`` and renamed once complete: by size after a
chunk, by age (a timer in the application calls :meth:`SensorStore.finish_aged`) and on
shutdown. Names sort by time::

    <UTC YYYYmmddTHHMMSSZ when opened>-<counter>-<link type>.pcapng

A chunk is stored whole or not at all: on an OSError (disk full, folder unwritable) every file
is cut back to its size before the chunk, files opened for it are removed, and
:class:`StoreError` carries the errno so the caller can answer 507. The files themselves are
:class:`ossensor_core.wire.rotating_pcapng.RotatingPcapngFiles`, shared with the file transport.

Methods of :class:`SensorStore` do blocking I/O; the application calls them in a worker
thread, one at a time per sensor (an asyncio lock per sensor).

Exactly once across a crash: before a chunk is acknowledged, a line goes into the sensor's
journal (``DATA_DIR/<sensor>/.chunks``): the chunk's sequence and the end position of every open
``.part`` file. A process that dies (SIGKILL, OOM) loses no acknowledged chunk, because the data
and the line are in the kernel's page cache before the answer leaves. At the next start
:func:`recover` cuts every ``.part`` file back to its last journaled position (what lies beyond
was never acknowledged: the sensor sends it again) and completes it, and the journal tells which
sequences are stored, so a retry of an acknowledged chunk is recognised after the restart too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ossensor_core.wire import rotating_pcapng as pcapng_files
from ossensor_core.errors import StorageError
from ossensor_core.wire.names import MAX_CHUNK_LINKTYPES
from ossensor_core.wire.rotating_pcapng import RotatingPcapngFiles
from ossensor_core.wire.chunk import Chunk

from .sequences import SequenceWindow

log = logging.getLogger(__name__)

DIR_MODE = 0o750
#: How many stored chunk sequences are remembered per sensor to recognise a retry. A retry comes
#: seconds after the original, so a bounded window is enough; the journal keeps it over restarts.
SEQUENCE_MEMORY = 65536
JOURNAL = ".chunks"


class StoreError(StorageError):
    """A chunk could not be stored; nothing of it was kept. ``errno`` is the OSError's."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message, errno)


def safe_name(sensor: str) -> str:
    """The sensor name as one path component: no separators, no leading dot (so no ``..``,
    and no clash with the vSensor's own ``.tls`` folder)."""
    return pcapng_files.safe_name(sensor, "_")


class SensorStore:
    """The pcapng files of one sensor, and the chunk sequences already stored.

    The files are :class:`~ossensor_core.wire.rotating_pcapng.RotatingPcapngFiles` (a file stays open
    after a failed chunk is cut off it); this class adds the folder, the sequences and
    StoreError. Failures to complete a file are logged (its packets stay in the ``.part``
    file) and not raised: the chunks in it were stored.
    """

    def __init__(self, data_dir: Path, sensor: str, rotate_bytes: int,
                 rotate_seconds: float) -> None:
        self.sensor = sensor
        self.directory = Path(data_dir) / safe_name(sensor)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        # One chunk never needs more files than its link types (MAX_CHUNK_LINKTYPES); older
        # link types' files are completed to make room.
        self._files = RotatingPcapngFiles(self.directory, "", rotate_bytes, rotate_seconds,
                                          continue_after_failure=True,
                                          max_open=MAX_CHUNK_LINKTYPES)
        self._sequences = SequenceWindow(SEQUENCE_MEMORY)
        self._journal: int | None = None  # descriptor, opened by the first write
        self._journal_lines = 0

    def load(self) -> None:
        """Remember the sequences of the journal (a crashed run's folder is recovered first, by
        :func:`recover`, at the vSensor's start)."""
        try:
            # Line by line into the window (the lowest go beyond SEQUENCE_MEMORY): a journal
            # of 131,072 lines as a list would be a transient 20 MiB that the heap keeps.
            for sequence, _ in journal_entries(self.directory / JOURNAL):
                self.remember(sequence)
        except OSError as exc:  # writing will fail too, and be answered 507
            log.error("cannot read the journal of %r in %s: %s", self.sensor, self.directory,
                      exc.strerror or exc)

    @property
    def files_completed(self) -> int:
        return self._files.files_completed

    @property
    def idle(self) -> bool:
        """No file open: every chunk stored is in a completed file; the store may be closed
        (its journal too) and opened again by the next chunk."""
        return self._files.open_files == 0

    # Sequences ---------------------------------------------------------------------------

    def seen(self, sequence: int) -> bool:
        return sequence in self._sequences

    def remember(self, sequence: int) -> None:
        self._sequences.add(sequence)

    # Writing -----------------------------------------------------------------------------

    def write_chunk(self, chunk: Chunk) -> int:
        """Append every batch of ``chunk``; return the bytes added. Raises StoreError."""
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(chunk, exc.strerror or str(exc), exc.errno) from exc
        try:
            added = self._files.write_chunk(chunk, lambda ends: self._log(chunk.sequence, ends))
        except StorageError as exc:
            raise self._error(chunk, exc.reason, exc.errno) from exc.__cause__
        with contextlib.suppress(StorageError):  # logged
            self._files.complete_full()
        return added

    def _log(self, sequence: int, ends: list[tuple[Path, int]]) -> None:
        """Journal a chunk as stored (called by the writer after its data; an OSError here
        cuts the chunk off the files again)."""
        path = self.directory / JOURNAL
        if self._journal is None or self._journal_lines >= 2 * SEQUENCE_MEMORY:
            self._compact(path)
        line = f"{sequence} " + ",".join(f"{p.name}:{end}" for p, end in ends) + "\n"
        assert self._journal is not None
        data = line.encode()
        written = os.write(self._journal, data)  # one short write: whole, or undone here
        if written != len(data):  # the disk filled up in the middle of the line
            os.ftruncate(self._journal, os.lseek(self._journal, 0, os.SEEK_END) - written)
            raise OSError(errno.ENOSPC, "the journal line was written only in part")
        self._journal_lines += 1

    def _compact(self, path: Path) -> None:
        """(Re)open the journal, keeping only its last SEQUENCE_MEMORY lines when it grew.

        Two passes over the file, a line at a time: one counts, the other copies what is
        kept. Holding the kept lines instead (up to 65,536) was a transient of ~10 MiB at
        every first chunk after a start, in proportion to the journal's length, which the heap
        kept: each restarted vSensor started larger the longer the run (``docs/soak.md``).
        """
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
        _cut_partial_line(path)
        lines = sum(1 for _ in journal_entries(path))
        if lines > SEQUENCE_MEMORY:
            temporary = path.with_name(path.name + ".new")
            with open(temporary, "w") as out:
                kept = itertools.islice(journal_entries(path), lines - SEQUENCE_MEMORY, None)
                out.writelines(f"{seq} {rest}\n" for seq, rest in kept)
            os.replace(temporary, path)
            lines = SEQUENCE_MEMORY
        self._journal = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                0o640)
        self._journal_lines = lines

    def _error(self, chunk: Chunk, reason: str, errno: int | None) -> StoreError:
        return StoreError(f"cannot store chunk {chunk.sequence} of {self.sensor!r} in "
                          f"{str(self.directory)!r}: {reason}", errno)

    def finish_aged(self, now: float | None = None) -> None:
        with contextlib.suppress(StorageError):  # logged
            self._files.complete_aged(now)

    def next_due(self) -> float | None:
        """time.monotonic() at which the oldest open file is due, or None."""
        return self._files.next_due()

    def close(self) -> None:
        """Complete every open file (rename the ``.part`` files)."""
        with contextlib.suppress(StorageError):  # logged
            self._files.close()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None


def journal_entries(path: Path) -> Iterator[tuple[int, str]]:
    """``(sequence, file ends)`` of every complete line of a journal, read a line at a time;
    nothing when there is none. A last line without its newline (the process died while
    writing it) is ignored."""
    try:
        source = open(path, errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return
    with source:
        for line in source:
            if not line.endswith("\n"):
                return
            sequence, _, rest = line[:-1].partition(" ")
            if sequence.isdigit():
                yield int(sequence), rest


def _cut_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a write cut short: disk full, a crash of the
    machine) off the journal, so the next line is not appended to it and read as one with
    it."""
    try:
        handle = open(path, "r+b")
    except FileNotFoundError:
        return
    with handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(max(0, size - 4096))
        tail = handle.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n") + 1
        # A line is far shorter than 4 KiB: without a newline there the tail is all garbage.
        keep = size - len(tail) + cut if cut or size <= 4096 else size - len(tail)
        handle.truncate(keep)
        log.warning("journal %s: an unfinished last line (%d bytes) cut off", path,
                    size - keep)


def read_journal(path: Path) -> list[tuple[int, str]]:
    """Every entry of :func:`journal_entries`, as a list (for tests and small journals)."""
    return list(journal_entries(path))


#: How much of a ``.part`` file recovery reads at a time: it walks the block headers, never
#: holding the file (up to the rotation size, 100 MiB by default) in memory.
RECOVERY_READ = 1 << 20


def _complete_blocks(handle: BinaryIO, limit: int) -> tuple[int, bool]:
    """End of the last complete pcapng block within the first ``limit`` bytes of ``handle``,
    and whether a packet block is among them. Reads the file a window at a time."""
    position, packets = 0, False
    window, start = b"", 0  # window holds the file's bytes [start, start + len(window))
    while position + 12 <= limit:
        if position + 8 > start + len(window):
            handle.seek(position)
            window, start = handle.read(RECOVERY_READ), position
            if len(window) < 8:
                break
        kind, length = struct.unpack_from("<II", window, position - start)
        if length < 12 or length % 4 or position + length > limit:
            break
        packets = packets or kind in (3, 6)
        position += length
    return position, packets


def recover(folder: Path) -> list[str]:
    """Cut the ``.part`` files of a sensor folder back to what was acknowledged, and complete
    them (see the module). Returns one line per file, for the log."""
    journal = folder / JOURNAL
    has_journal = journal.exists()
    ends: dict[str, int] = {}
    for _, rest in journal_entries(journal):
        for item in rest.split(","):
            name, _, end = item.rpartition(":")
            if name and end.isdigit():
                ends[name] = int(end)
    done = []
    for part in sorted(folder.glob("*" + pcapng_files.PART_SUFFIX)):
        with open(part, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            if handle.read(4) != b"\x0a\x0d\x0d\x0a":  # not a pcapng file of ours: not ours to cut
                done.append(f"{part.name}: left alone (not a pcapng file)")
                continue
            # With a journal: up to the last acknowledged end; without (an older vSensor):
            # every whole block.
            limit = min(ends.get(part.name, 0), size) if has_journal else size
            keep, packets = _complete_blocks(handle, limit)
            if packets:
                handle.truncate(keep)
                os.fsync(handle.fileno())
        final = part.with_name(part.name[:-len(pcapng_files.PART_SUFFIX)])
        if not packets:
            part.unlink()
            done.append(f"{part.name}: removed (no acknowledged packet)")
            continue
        os.replace(part, final)
        done.append(f"{part.name}: {size - keep} bytes past the last acknowledged chunk "
                    f"cut off, completed as {final.name}")
    return done


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
