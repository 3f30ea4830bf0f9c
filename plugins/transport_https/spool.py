"""The spool: chunks kept on disk while the vSensor is away, one file per chunk.

A chunk is written under a temporary name, synced and renamed, so that a crash leaves either the
whole chunk or a ``.tmp`` file (removed at the next start). File names carry the run, the
sequence and the packet count: the next run sends an earlier run's chunks first, oldest first.
The files are mode 0600: captured payloads are sensitive. Accounting (what was dropped) is the
transport's; this module only keeps the files and their sizes.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ossensor_core.errors import TransportError

log = logging.getLogger(__package__)  # one logger for the whole transport

SPOOL_SUFFIX = ".chunk"
TEMP_SUFFIX = ".tmp"
FILE_MODE = 0o600  # captured payloads are sensitive
_SPOOL_NAME = re.compile(r"^(\d{20})-(\d{1,20})-(\d+)\.chunk$")


@dataclass(eq=False)
class QueuedChunk:
    """One accepted chunk: its bytes in memory, or a file in the spool."""

    order: int  # send order: earlier runs' spool first, then accepted order
    sequence: int
    packets: int
    size: int
    payload: bytes | None = None
    path: Path | None = field(default=None)
    digest: tuple[str, str] | None = None  # (algorithm, content_digest(payload)), computed once


class Spool:
    """The spooled chunks of one folder, sorted by send order, and their total size."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.entries: list[QueuedChunk] = []  # sorted by order
        self.size = 0
        self._run_id = time.time_ns()

    def __len__(self) -> int:
        return len(self.entries)

    def write(self, entry: QueuedChunk) -> Path:
        """Write ``entry``'s payload to a file of its own (blocking: run it on a thread)."""
        assert entry.payload is not None
        name = f"{self._run_id:020d}-{entry.sequence:020d}-{entry.packets}{SPOOL_SUFFIX}"
        final = self.folder / name
        temporary = self.folder / (name + TEMP_SUFFIX)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(entry.payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.close(fd)
        os.replace(temporary, final)
        return final

    def add(self, entry: QueuedChunk, path: Path) -> None:
        """Keep ``entry`` as the file ``path`` (written by :meth:`write`), not in memory."""
        entry.path, entry.payload = path, None
        self.insert(entry)
        self.size += entry.size

    def insert(self, entry: QueuedChunk) -> None:
        """Put a spooled entry (back) in its place."""
        bisect.insort(self.entries, entry, key=lambda e: e.order)

    def pop_oldest(self) -> QueuedChunk:
        return self.entries.pop(0)

    def over_limit(self) -> list[QueuedChunk]:
        """Delete the oldest chunks until the spool fits its limit; the ones deleted."""
        dropped = []
        while self.size > self.max_bytes and self.entries:
            oldest = self.entries.pop(0)
            self.remove(oldest)
            dropped.append(oldest)
        return dropped

    def remove(self, entry: QueuedChunk) -> None:
        """Delete ``entry``'s file (sent, or dropped)."""
        if entry.path is None:
            return
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove spooled chunk %s: %s", entry.path, exc.strerror or exc)
        self.size -= entry.size
        entry.path = None

    def load(self, next_order: Callable[[], int]) -> None:
        """Queue the chunks an earlier run left in the folder, oldest first (blocking)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            names = os.listdir(self.folder)
        except OSError as exc:
            raise TransportError(f"cannot use the spool folder {str(self.folder)!r}: "
                                 f"{exc.strerror or exc}") from exc
        found = []
        for name in names:
            path = self.folder / name
            if name.endswith(TEMP_SUFFIX):  # a write that a crash interrupted
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            match = _SPOOL_NAME.match(name)
            if not match:
                if name.endswith(SPOOL_SUFFIX):
                    log.warning("%s in the spool is not named like a chunk of ours; left alone",
                                path)
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            found.append((int(match[1]), int(match[2]), int(match[3]), size, path))
        for _run, sequence, packets, size, path in sorted(found):
            self.entries.append(QueuedChunk(next_order(), sequence, packets, size, path=path))
            self.size += size
        if found:
            log.info("%d chunks (%d bytes) from an earlier run are in the spool %s; sending "
                     "them first", len(found), self.size, self.folder)
