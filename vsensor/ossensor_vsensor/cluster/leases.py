"""Which store worker holds which partition: leases in the ``ossensor-store`` bucket.

A worker holds partition ``pNN`` while key ``partition.pNN`` names it and it keeps renewing
the key (an update that names the revision it wrote last, so that two workers can never both
believe they renewed it). Every worker also renews ``worker.<name>`` (its report), which is
how the others count the live workers.

Expiry is judged by each worker on its own clock, never by comparing timestamps written by
other machines: a key whose revision this worker has seen unchanged for :attr:`lease` seconds
is expired. A worker that just started has seen nothing change yet, so it waits one lease
before taking a partition from anyone, which is what makes the handover safe without clocks
in step. Two exceptions need no waiting: a key that is absent or deleted (free), and a key that
names this very worker: a worker restarted under its name (a StatefulSet pod with its volume)
takes its partitions back at once, so each sensor's files and journal stay on one volume.

Balance: with ``W`` live workers each aims at ``ceil(PARTITIONS / W)`` partitions. It takes
free or expired ones while under that, and releases its excess (stopping the partition's
consumer first, then deleting the key) while over it. Which ones is decided by rendezvous
hashing of (worker, partition), so that a partition tends to go back to the same worker, and
its sensors' files to the same volume, as workers come and go.

A worker that cannot renew a partition for half a lease (NATS unreachable) stops consuming it
on its own, before anyone else may take it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import PARTITIONS

log = logging.getLogger("ossensor_vsensor.cluster.store")

WORKER_PREFIX = "worker."
PARTITION_PREFIX = "partition."
#: The most worker keys looked at (a bucket full of stale names must not cost without end).
MAX_WORKERS = 256


def partitions() -> list[str]:
    return [f"p{i:02d}" for i in range(PARTITIONS)]


def score(worker: str, part: str) -> int:
    """Rendezvous hashing: the worker with the highest score is a partition's first choice."""
    return int.from_bytes(hashlib.sha256(f"{worker}/{part}".encode()).digest()[:8], "big")


class PartitionLeases:
    """One worker's side of the leases; :meth:`tick` is called every few seconds."""

    def __init__(self, kv: Any, name: str, lease: float) -> None:
        self.kv, self.name, self.lease = kv, name, lease
        self.held: dict[str, int] = {}  # partition -> revision written last
        self.renewed: dict[str, float] = {}  # partition -> monotonic time of the last renewal
        # key -> (revision, monotonic time this worker first saw that revision)
        self.seen: dict[str, tuple[int, float]] = {}
        self.live_workers = 1

    def _observe(self, key: str, revision: int, now: float) -> float:
        """How long ``key`` has stood at ``revision``, as far as this worker saw."""
        known = self.seen.get(key)
        if known is None or known[0] != revision:
            self.seen[key] = (revision, now)
            return 0.0
        return now - known[1]

    async def _entry(self, key: str) -> Any | None:
        from nats.js.errors import KeyDeletedError, KeyNotFoundError
        try:
            return await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None

    async def tick(self, report: bytes, stop: Callable[[str], Awaitable[None]]
                   ) -> tuple[list[str], list[str]]:
        """Renew, balance and take; returns (partitions gained, partitions lost). ``stop`` is
        awaited for a partition before its key is released, so that no two workers consume it
        at once."""
        from nats.js.errors import NoKeysError
        now = time.monotonic()
        await self.kv.put(WORKER_PREFIX + self.name, report)
        try:
            keys = [k for k in await self.kv.keys() if k.startswith(WORKER_PREFIX)]
        except NoKeysError:
            keys = []
        live = 1
        for key in sorted(keys)[:MAX_WORKERS]:
            if key == WORKER_PREFIX + self.name:
                continue
            entry = await self._entry(key)
            if entry is not None and self._observe(key, entry.revision, now) < self.lease:
                live += 1
        self.live_workers = live
        names = partitions()
        entries = dict(zip(names, await asyncio.gather(
            *(self._entry(PARTITION_PREFIX + p) for p in names))))
        lost = await self._renew(entries, now)
        target = math.ceil(PARTITIONS / live)
        excess = sorted(self.held, key=lambda p: score(self.name, p))[:max(
            0, len(self.held) - target)]
        # At once: each finishes the batch in hand first, and renewals must not wait for that.
        await asyncio.gather(*(stop(part) for part in excess))
        for part in excess:
            revision = self.held.pop(part)
            self.renewed.pop(part, None)
            try:
                await self.kv.delete(PARTITION_PREFIX + part, last=revision)
            except Exception as exc:  # taken meanwhile, or NATS gone: the lease runs out
                log.info("releasing %s: %s", part, exc or type(exc).__name__)
            log.info("released %s (%d live workers, aiming at %d partitions)", part, live, target)
        # What was just released or lost still names this worker in ``entries``.
        gained = await self._take(entries, target, now, skip={*lost, *excess})
        return gained, lost + excess

    async def _renew(self, entries: dict[str, Any], now: float) -> list[str]:
        from nats.js.errors import KeyWrongLastSequenceError
        lost = []
        for part, revision in list(self.held.items()):
            entry = entries[part]
            if entry is not None and entry.revision != revision:
                lost.append(part)
                log.warning("%s was taken by %r: stopping it", part, _value(entry))
                continue
            try:
                self.held[part] = await self.kv.update(PARTITION_PREFIX + part,
                                                       self.name.encode(), last=revision)
                self.renewed[part] = now
            except KeyWrongLastSequenceError:
                lost.append(part)
                log.warning("%s was taken by another worker: stopping it", part)
            except Exception as exc:
                if now - self.renewed.get(part, now) > self.lease / 2:
                    lost.append(part)
                    log.warning("cannot renew %s for %.0f s (%s): stopping it", part,
                                now - self.renewed[part], exc or type(exc).__name__)
        for part in lost:
            self.held.pop(part, None)
            self.renewed.pop(part, None)
        return lost

    async def _take(self, entries: dict[str, Any], target: int, now: float,
                    skip: set[str]) -> list[str]:
        mine, free = [], []
        for part, entry in entries.items():
            if part in self.held or part in skip:
                continue
            if entry is None:
                free.append(part)
            elif _value(entry) == self.name:
                mine.append(part)  # restarted under the same name: ours at once
            elif self._observe(PARTITION_PREFIX + part, entry.revision, now) >= self.lease:
                free.append(part)
        free.sort(key=lambda p: score(self.name, p), reverse=True)
        wanted = mine + free[:max(0, target - len(self.held) - len(mine))]
        gained = []
        for part in wanted:
            entry = entries[part]
            try:
                if entry is None:
                    revision = await self.kv.create(PARTITION_PREFIX + part, self.name.encode())
                else:
                    revision = await self.kv.update(PARTITION_PREFIX + part, self.name.encode(),
                                                    last=entry.revision)
            except Exception as exc:  # another worker was quicker
                log.info("cannot take %s: %s", part, exc or type(exc).__name__)
                continue
            self.held[part] = revision
            self.renewed[part] = now
            gained.append(part)
            previous = "free" if entry is None else f"held by {_value(entry)!r}"
            log.info("took %s (%s)", part, previous)
        return gained

    def fence(self) -> list[str]:
        """The partitions not renewed for half a lease, dropped (when a whole tick failed)."""
        now = time.monotonic()
        lost = [p for p in self.held if now - self.renewed.get(p, now) > self.lease / 2]
        for part in lost:
            self.held.pop(part, None)
            self.renewed.pop(part, None)
            log.warning("cannot renew %s for half a lease: stopping it", part)
        return lost

    async def release_all(self, stop: Callable[[str], Awaitable[None]]) -> None:
        """Not used at SIGTERM (a restarted pod takes its partitions back at once); for a
        worker leaving for good."""
        for part in list(self.held):
            await stop(part)
            revision = self.held.pop(part)
            try:
                await self.kv.delete(PARTITION_PREFIX + part, last=revision)
            except Exception as exc:
                log.info("releasing %s: %s", part, exc or type(exc).__name__)


def _value(entry: Any) -> str:
    return bytes(entry.value or b"")[:128].decode(errors="replace")
