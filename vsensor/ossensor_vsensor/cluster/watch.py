"""Following a key-value bucket: every replica keeps a local mirror of what the others wrote.

:class:`BucketWatch` runs one JetStream watch of a whole bucket (the current value of every key
first, then every change) and hands each entry to a callback, in order. A value is hostile until
the callback has parsed it (another replica may be compromised or buggy): values over
``max_value`` bytes are skipped before anything reads them, and whatever the callback refuses
(``ValueError``) is skipped too, with one bounded log line per key and revision, never a crash
and never a stop of the watch. The watch is started again (after a pause) should it fail, e.g.
when the NATS servers restart: the first pass then delivers every current value again, so the
callbacks must be idempotent (they are: a value replaces what the mirror held for the key).

A watch can also fall silent without failing: measured with three servers, after the server
holding its (ordered, ephemeral) consumer was SIGKILLed, new values reached the watch only after
about 18 s. So once a second the bucket's last sequence is compared with the last revision the
watch delivered (the last message of a bucket is always the latest value of its key, so a watch
that keeps up has delivered it); a watch behind for :data:`STALE_SECONDS` is started again.
Making the new watch needs JetStream's meta leader: when that was the server killed, values
reach the watch once a new leader is elected (measured here: up to 25 s, 0-3 s otherwise).
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
_RESTART_SECONDS = 0.5
CHECK_SECONDS = 1.0
STALE_SECONDS = 2.0


def shown(key: str) -> str:
    """A key fit for one log line (bounded, stray characters escaped)."""
    return repr(key[:_LOGGED_KEY])


class BucketWatch:
    """One bucket followed for the life of a replica (:meth:`start`, :meth:`stop`)."""

    def __init__(self, kv: Any, name: str, on_entry: EntryCallback, max_value: int,
                 js: Any = None) -> None:
        """``js``: the JetStream context, for the check that the watch keeps up (none
        without it)."""
        self.kv = kv
        self.name = name
        self.on_entry = on_entry
        self.max_value = max_value
        self.js = js
        self.ready = asyncio.Event()  # set once the current values were all delivered
        self.skipped = 0
        self.restarts = 0
        self.last_revision = 0
        self._watcher: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"watch {self.name}")]
        if self.js is not None:
            self._tasks.append(loop.create_task(self._check(), name=f"check {self.name}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _check(self) -> None:
        """Start the watch again when it stays behind the bucket (see the docstring)."""
        behind_since: float | None = None
        restarted_at = -1  # the bucket's last sequence when the watch was last started again
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    info = await self.js.stream_info(f"KV_{self.name}")
                last = int(info.state.last_seq or 0)
            except Exception:  # NATS away: the watch itself fails and is started again
                continue
            if last == restarted_at and self.ready.is_set():
                # Nothing was written since the restart: what the watch lacks is gone from
                # the bucket (deleted markers purged), not late.
                self.last_revision = max(self.last_revision, last)
            if last <= self.last_revision or self._watcher is None:
                behind_since = None
                continue
            behind_since = behind_since or loop.time()
            if loop.time() - behind_since >= STALE_SECONDS:
                behind_since, restarted_at = None, last
                self.restarts += 1
                log.warning("NATS: watch of %s is behind the bucket (revision %d of %d); "
                            "following it again", self.name, self.last_revision, last)
                with contextlib.suppress(Exception):
                    await self._watcher.stop()

    async def _run(self) -> None:
        while True:
            watcher = None
            try:
                watcher = self._watcher = await self.kv.watchall()
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
                self._watcher = None
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(_RESTART_SECONDS)

    def _mark_ready(self) -> None:
        self.ready.set()

    async def _deliver(self, entry: Any) -> None:
        key = str(entry.key)
        self.last_revision = max(self.last_revision, int(entry.revision or 0))
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
