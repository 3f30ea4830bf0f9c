"""Nonces that survive a restart, so a request captured before it cannot be replayed after it.

The rule: every accepted nonce is appended, with the time it was seen, to
``DATA_DIR/.nonces`` before the request's body is read; at start the nonces seen within twice
the skew window are loaded back (an older request fails the timestamp check anyway). The file
is rewritten with only the live nonces once it holds more than twice as many lines as there
are live nonces (and at least :data:`COMPACT_AFTER`), so it stays bounded by the nonce cache's
own limit. It is not fsync'ed: a restart of the process keeps it (the page cache), a crash of
the whole machine may lose its last lines (documented in ``docs/security.md``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

from ossensor_core.wire.signing import NonceCache

log = logging.getLogger("ossensor_vsensor")

NONCE_FILE = ".nonces"
COMPACT_AFTER = 100_000  # lines appended before a rewrite is considered
_MAX_LINE = 200  # a nonce is at most 128 characters: longer lines are not ours


class JournaledNonces(NonceCache):
    """A :class:`~ossensor_core.wire.signing.NonceCache` kept in an append-only file."""

    def __init__(self, path: Path, window_seconds: float, now: float,
                 limit: int = 1_000_000) -> None:
        super().__init__(window_seconds, limit)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load(now)
        self._lines = len(self._seen)
        self._compact()
        self._file: BinaryIO = open(self.path, "ab", buffering=0)

    def _load(self, now: float) -> None:
        """Read the file line by line (never whole), keeping what is still in the window."""
        try:
            source = open(self.path, "rb")
        except FileNotFoundError:
            return
        skipped = 0
        with source:
            for raw in source:
                seen, _, nonce = raw[:_MAX_LINE].rstrip(b"\n").partition(b" ")
                try:
                    seen_at = float(seen)
                    text = nonce.decode("ascii")
                except (ValueError, UnicodeDecodeError):
                    skipped += 1
                    continue
                if 16 <= len(text) <= 128 and now - seen_at <= 2 * self.window:
                    super().check_and_add(text, seen_at)
        log.info("loaded %d nonces seen within %g s from %s%s", len(self._seen),
                 2 * self.window, self.path,
                 f" ({skipped} unreadable lines skipped)" if skipped else "")

    def _compact(self) -> None:
        """Rewrite the file with the live nonces only (atomically)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.writelines(f"{seen_at:.3f} {nonce}\n".encode() for nonce, seen_at
                           in self._seen.items())
        os.replace(tmp, self.path)
        self._lines = len(self._seen)

    def check_and_add(self, nonce: str, now: float) -> bool:
        if not super().check_and_add(nonce, now):
            return False
        try:
            self._file.write(f"{now:.3f} {nonce}\n".encode())
            self._lines += 1
            if self._lines > max(COMPACT_AFTER, 2 * len(self._seen)):
                self._file.close()
                self._compact()
                self._file = open(self.path, "ab", buffering=0)
        except OSError as exc:
            # The request is genuine and its nonce is remembered in memory: a full disk must
            # not stop sensors, only weaken the replay protection across a restart.
            log.error("cannot record a nonce in %s (%s): a restart now would forget it",
                      self.path, exc.strerror or exc)
        return True

    def close(self) -> None:
        self._file.close()
