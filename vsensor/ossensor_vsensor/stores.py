"""Every sensor's :class:`~.store.SensorStore`, kept by the running vSensor.

A sensor's store is opened on its first chunk and written by one task at a time (a lock per
sensor; the writes themselves run in a worker thread). Once its files are completed by age (the
sensor fell silent) the store is closed, journal included, and dropped: the next chunk opens it
again and reads the journal, so a silent sensor costs no descriptor and no memory. Beside the chunks, this is where files are
completed by age, retention deletes old ones, a crashed run's ``.part`` files are recovered at
start and every open file is completed at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Protocol

from ossensor_core.wire.chunk import Chunk

from .store import SensorStore, enforce_retention, recover

log = logging.getLogger("ossensor_vsensor")


class StoreSettings(Protocol):
    """What the stores read of their settings: :class:`~.settings.VSensorSettings` in single
    mode, the store worker's settings in cluster mode (``cluster/store_worker.py``)."""

    data_dir: Path
    rotate_bytes: int
    rotate_seconds: float
    retain_seconds: float | None
    retain_bytes: int | None
    retention_interval: float


class ShuttingDown(Exception):
    """The vSensor is closing its stores: a chunk that arrives now is not taken."""


class SensorStores:
    """The stores of all sensors, and the timers that complete and delete their files."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.stores: dict[str, SensorStore] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._timer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._retention: asyncio.Task[None] | None = None
        self._retention_wake = asyncio.Event()
        self._closed = False

    def _lock(self, sensor: str) -> asyncio.Lock:
        return self._locks.setdefault(sensor, asyncio.Lock())

    async def write(self, sensor: str, chunk: Chunk) -> int | None:
        """Store ``chunk`` and remember its sequence: the pcapng bytes added, or None when the
        sequence was stored before (a retry). Raises :class:`ShuttingDown`, or
        :class:`~.store.StoreError` when nothing was stored (disk full, folder unwritable)."""
        async with self._lock(sensor):
            if self._closed:
                raise ShuttingDown()
            store = self.stores.get(sensor)
            if store is None:
                store = SensorStore(self.settings.data_dir, sensor, self.settings.rotate_bytes,
                                    self.settings.rotate_seconds)
                await asyncio.to_thread(store.load)
                self.stores[sensor] = store
            if store.seen(chunk.sequence):
                return None
            completed = store.files_completed
            added = await asyncio.to_thread(store.write_chunk, chunk)
            store.remember(chunk.sequence)
            if store.files_completed != completed:
                self._retention_wake.set()
        self._wake.set()
        return added

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a crashed run left, then start the rotation and retention timers."""
        await asyncio.to_thread(self._recover)
        self._timer = asyncio.create_task(self._rotate_by_age(), name="vsensor file rotation")
        if self.settings.retain_seconds is not None or self.settings.retain_bytes is not None:
            self._retention = asyncio.create_task(self._retain(), name="vsensor retention")

    def _recover(self) -> None:
        """Complete what a crashed run left as ``.part`` files, cut back to the last
        acknowledged chunk (see store.py)."""
        try:
            folders = [f for f in self.settings.data_dir.iterdir()
                       if f.is_dir() and not f.name.startswith(".")]
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot list %s to recover unfinished files: %s", self.settings.data_dir,
                      exc.strerror or exc)
            return
        for folder in folders:
            try:
                for line in recover(folder):
                    log.warning("recovered %s/%s", folder.name, line)
            except OSError as exc:
                log.error("cannot recover the unfinished files of %s: %s", folder,
                          exc.strerror or exc)

    async def close(self) -> None:
        """Complete every open file (``.part`` renamed); later chunks are refused."""
        self._closed = True
        for task in (self._timer, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sensor, store in list(self.stores.items()):
            async with self._lock(sensor):
                await asyncio.to_thread(store.close)

    async def _rotate_by_age(self) -> None:
        while True:
            due = [d for d in (s.next_due() for s in list(self.stores.values())) if d is not None]
            delay = (min(due) - time.monotonic()) if due else self.settings.rotate_seconds
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                # A chunk that opens the first file wakes us to schedule its deadline.
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=min(max(delay, 0.05), 3600.0) if due else 3600.0)
                continue
            for sensor, store in list(self.stores.items()):
                async with self._lock(sensor):
                    completed = store.files_completed
                    try:
                        await asyncio.to_thread(store.finish_aged)
                    except Exception:  # keep rotating the other sensors' files
                        log.exception("rotating the files of %r failed", sensor)
                    if store.files_completed != completed:
                        self._retention_wake.set()
                    if store.idle:  # a silent sensor keeps no descriptor (journal) open
                        await asyncio.to_thread(store.close)
                        del self.stores[sensor]

    async def _retain(self) -> None:
        """Retention on a timer and after every completed file (``.part`` files are kept)."""
        settings = self.settings
        while True:
            self._retention_wake.clear()
            try:
                await asyncio.to_thread(enforce_retention, settings.data_dir,
                                        settings.retain_seconds, settings.retain_bytes)
            except Exception:  # never stop retention: a full disk would follow
                log.exception("retention in %s failed", settings.data_dir)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._retention_wake.wait(),
                                       timeout=settings.retention_interval)
