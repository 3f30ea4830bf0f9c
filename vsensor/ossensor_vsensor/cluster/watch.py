"""Following a key-value bucket: every replica keeps a local mirror of what the others wrote.

:class:`BucketWatch` runs one JetStream watch of a whole bucket (the current value of every key
first, then every change) and hands each entry to a callback, in order. A value is hostile until
the callback has parsed it (another replica may be compromised or buggy): values over
``max_value`` bytes are skipped before anything reads them, and whatever the callback refuses
(``ValueError``) is skipped too, with one bounded log line per key and revision, never a crash
and never a stop of the watch. The watch is started again (after a pause) should it fail, e.g.
when the NATS servers restart: the first pass then delivers every current value again, so the
callbacks must be idempotent (they are: a value replaces what the mirror held for the key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("ossensor_vsensor.cluster")

#: Called with (key, value, revision); value None: the key was deleted or purged.
EntryCallback = Callable[[str, bytes | None, int], Awaitable[None] | None]

_LOGGED_KEY = 120  # characters of a key shown in a log line
_RESTART_SECONDS = 1.0


def shown(key: str) -> str:
    """A key fit for one log line (bounded, stray characters escaped)."""
    return repr(key[:_LOGGED_KEY])


class BucketWatch:
    """One bucket followed for the life of a replica (:meth:`start`, :meth:`stop`)."""

    def __init__(self, kv: Any, name: str, on_entry: EntryCallback, max_value: int) -> None:
        self.kv = kv
        self.name = name
        self.on_entry = on_entry
        self.max_value = max_value
        self.ready = asyncio.Event()  # set once the current values were all delivered
        self.skipped = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"watch {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            watcher = None
            try:
                watcher = await self.kv.watchall()
                async for entry in watcher:
                    if entry is None:  # the current values are all delivered
                        self._mark_ready()
                        continue
                    await self._deliver(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the servers went away: follow again once back
                log.warning("NATS: watch of %s stopped (%s); following it again",
                            self.name, str(exc)[:200] or type(exc).__name__)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(_RESTART_SECONDS)

    def _mark_ready(self) -> None:
        self.ready.set()

    async def _deliver(self, entry: Any) -> None:
        key = str(entry.key)
        deleted = entry.operation in ("DEL", "PURGE")
        value = None if deleted else bytes(entry.value or b"")
        if value is not None and len(value) > self.max_value:
            self.skip(key, entry.revision, f"{len(value)} bytes, over the limit of "
                                           f"{self.max_value}")
            return
        try:
            result = self.on_entry(key, value, int(entry.revision or 0))
            if result is not None:
                await result
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            self.skip(key, entry.revision, str(exc))
        if entry.delta == 0:
            self._mark_ready()

    def skip(self, key: str, revision: Any, reason: str) -> None:
        """One bounded log line for a value that is not taken."""
        self.skipped += 1
        log.warning("NATS: %s: skipped key %s (revision %s): %s", self.name, shown(key),
                    revision, reason[:200])
