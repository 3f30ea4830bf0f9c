"""Storing chunks as rotating pcapng files: ``DATA_DIR/<sensor>/<name>.pcapng``.

One file per link type is open per sensor (tcpdump 4.99 refuses a pcapng file that mixes link
types). A file is written as ``NAME.pcapng.part`` and renamed once complete: by size after a
chunk, by age (a timer in the application calls :meth:`SensorStore.finish_aged`) and on
shutdown. Names sort by time::

    <UTC YYYYmmddTHHMMSSZ when opened>-<counter>-<link type>.pcapng

A chunk is stored whole or not at all: on an OSError (disk full, folder unwritable) every file
is cut back to its size before the chunk, files opened for it are removed, and
:class:`StoreError` carries the errno so the caller can answer 507. The files themselves are
:class:`ossensor_core.pcapng_files.RotatingPcapngFiles`, shared with the file transport.

Methods of :class:`SensorStore` do blocking I/O; the application calls them in a worker
thread, one at a time per sensor (an asyncio lock per sensor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

from ossensor_core import pcapng_files
from ossensor_core.errors import StorageError
from ossensor_core.pcapng_files import RotatingPcapngFiles
from ossensor_core.protocols import Chunk

log = logging.getLogger(__name__)

DIR_MODE = 0o750
#: How many stored chunk sequences are remembered per sensor to recognise a retry. A retry comes
#: seconds after the original, so a bounded window is enough; the memory is lost on restart.
SEQUENCE_MEMORY = 65536


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

    The files are :class:`~ossensor_core.pcapng_files.RotatingPcapngFiles` (a file stays open
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
        self._files = RotatingPcapngFiles(self.directory, "", rotate_bytes, rotate_seconds,
                                          continue_after_failure=True)
        self._sequences: OrderedDict[int, None] = OrderedDict()

    @property
    def files_completed(self) -> int:
        return self._files.files_completed

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
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(chunk, exc.strerror or str(exc), exc.errno) from exc
        try:
            added = self._files.write_chunk(chunk)
        except StorageError as exc:
            raise self._error(chunk, exc.reason, exc.errno) from exc.__cause__
        with contextlib.suppress(StorageError):  # logged
            self._files.complete_full()
        return added

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
