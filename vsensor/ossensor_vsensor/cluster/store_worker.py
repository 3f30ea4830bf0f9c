"""The store worker: the chunk stream turned into the same pcapng files as single mode.

``ossensor-vsensor store`` (``store_cli.py``) runs one :class:`StoreWorker`. It holds some of
the stream's partitions (leases, ``leases.py``) and, for each, pulls from the partition's
durable consumer ``store-pNN`` in batches. A message is read (``parts.py``: headers checked
against the subject, parts put back together), decoded, and written by the same
:class:`~ossensor_vsensor.stores.SensorStores` as single mode: the same folders, rotation,
retention, journal and ``.part`` recovery. One partition is handled in stream order by one
task, so each sensor's chunks are stored in the order JetStream holds them.

Exactly once across the worker's own crashes: a message is acknowledged only after the store
returned, and the store journals a chunk's sequence before it returns. A worker killed between
the two gets the message again (after the consumer's ``ack_wait``) and finds the sequence in
the journal: a duplicate, acknowledged and not stored again. A sensor's retry that reached the
stream twice (beyond JetStream's two-minute de-duplication window, or through two replicas) is
recognised the same way, over the last 65,536 sequences of the sensor, as in single mode.

What cannot be stored is never allowed to stop a partition: a message that is not a chunk by
the contract, does not decode, or whose chunk names another sensor or sequence than its headers
is logged in one bounded line and terminated (it leaves the stream). A store that fails (disk
full) is retried every few seconds, holding the partition: nothing is acknowledged that is not
stored, and the stream fills until replicas answer 507. A message whose decoding or storing
raises anything else (a defect of ours) is delivered again two seconds later and terminated at
its third delivery, with the traceback logged: without that bound it would come back after
every ``ack_wait`` for ever.

Order across a takeover: messages delivered to a partition's previous holder and never
acknowledged (it was killed) come back only after the consumer's ``ack_wait`` (60 s), while new
ones would come at once. A partition taken with messages out therefore waits that long before
its first pull, so that a sensor's chunks are never stored out of order; the stream holds what
arrives meanwhile.

Memory, per held partition: one pull of at most :data:`FETCH_BYTES` (messages are at most the
server's ``max_payload``), the incomplete chunks (``parts.py``: at most 8, at most twice
``MAX_CHUNK_BYTES`` together, for the de-duplication window plus half a minute, their messages
kept in progress meanwhile) and the chunk being decoded. The second bound is for 64 MiB
chunks from several replicas at once; sensors' chunks are a few MiB, so in practice a worker
holds a few MiB per partition.

Every few seconds the worker puts ``worker.<name>`` in the ``ossensor-store`` bucket: the
partitions it holds, what it stored, and each partition's backlog (messages not yet delivered
plus delivered and not acknowledged), for the status pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.wire.names import MAX_CHUNK_BYTES

from ..store import StoreError
from ..stores import SensorStores, ShuttingDown
from . import STREAM
from .connection import Cluster, ClusterSettings
from .leases import PartitionLeases
from .parts import (PART_WAIT_MARGIN, PART_WAIT_SECONDS, BadMessage, Dropped, Reassembly,
                    read_headers)

log = logging.getLogger("ossensor_vsensor.cluster.store")

#: How long one pull waits for messages: also how soon a stopping partition notices.
FETCH_WAIT = 1.0
#: Bytes fetched at once per partition (divided by the server's ``max_payload`` to give the
#: batch size): what one partition holds in memory beside its incomplete chunks.
FETCH_BYTES = 8 << 20
MAX_BATCH = 64
#: Beyond ``ack_wait``, for the server to put the messages out back in line.
REDELIVERY_MARGIN = 2.0
#: How often held parts are marked in progress: well within the consumers' ack_wait (60 s).
PROGRESS_SECONDS = 20.0
#: Seconds between tries to store a chunk the disk refused.
STORE_RETRY = 5.0
#: A message whose handling raised an unexpected exception (a defect of ours) is delivered
#: again after this many seconds, and terminated after this many deliveries.
FAILED_RETRY = 2.0
FAILED_DELIVERIES = 3


@dataclass(frozen=True)
class StoreWorkerSettings:
    """What ``ossensor-vsensor store`` is told; the fields :class:`SensorStores` reads have the
    names of :class:`~ossensor_vsensor.settings.VSensorSettings`."""

    data_dir: Path
    cluster: ClusterSettings
    rotate_bytes: int = 100 << 20
    rotate_seconds: float = 300.0
    retain_seconds: float | None = None
    retain_bytes: int | None = None
    retention_interval: float = 10.0
    #: A partition whose holder stopped renewing it for this long may be taken by another.
    lease_seconds: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not 1.0 <= self.lease_seconds <= 3600:
            raise ValueError("the lease of a partition must be 1-3600 seconds")

    @property
    def tick_seconds(self) -> float:
        """How often leases are renewed and the report is put: several times per lease."""
        return min(5.0, self.lease_seconds / 6)


@dataclass
class Counters:
    chunks: int = 0
    packets: int = 0
    bytes: int = 0
    duplicates: int = 0
    refused: int = 0
    dropped: int = 0  # incomplete chunks given up
    started: float = field(default_factory=time.time)


class PartitionConsumer:
    """One held partition: a pull subscription on ``store-<part>``, handled in order."""

    def __init__(self, worker: StoreWorker, part: str) -> None:
        self.worker, self.part = worker, part
        self.stopping = False
        max_payload = max(1024, worker.max_payload)
        self.batch = max(1, min(MAX_BATCH, FETCH_BYTES // max_payload))
        # Parts are at most max_payload less their headers: half of it is a generous floor.
        self.max_parts = math.ceil(MAX_CHUNK_BYTES / (max_payload // 2)) + 1
        self.reassembly = Reassembly(max_bytes=2 * MAX_CHUNK_BYTES, wait=worker.part_wait)
        self.task = asyncio.create_task(self._run(), name=f"store {part}")

    async def stop(self) -> None:
        """Finish the batch in hand and unsubscribe; held parts stay unacknowledged (they
        come back to whoever holds the partition next)."""
        self.stopping = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _run(self) -> None:
        import nats.errors
        js = self.worker.cluster.js
        sub = None
        failures = 0
        await self._wait_for_outstanding()
        while not self.stopping:
            try:
                if sub is None:
                    sub = await js.pull_subscribe_bind(durable=f"store-{self.part}",
                                                       stream=STREAM)
                messages = await sub.fetch(self.batch, timeout=FETCH_WAIT)
                failures = 0
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                messages = []
            except Exception as exc:  # NATS gone, leader election: try again shortly
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("%s: cannot fetch (%s); retrying", self.part,
                                str(exc)[:200] or type(exc).__name__)
                await asyncio.sleep(min(5.0, 0.2 * failures))
                continue
            try:
                for message in messages:
                    await self._handle(message)
                await self._give_up(self.reassembly.expired())
                for held in self.reassembly.to_touch(PROGRESS_SECONDS):
                    await held.in_progress()
            except Exception as exc:  # an acknowledgement lost with the connection: what
                # was stored is recognised as a duplicate when it comes back
                failures += 1
                log.warning("%s: %s (what was not acknowledged comes back)", self.part,
                            str(exc)[:200] or type(exc).__name__)
                await asyncio.sleep(min(5.0, 0.2 * failures))
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _wait_for_outstanding(self) -> None:
        """Messages delivered to this partition's previous holder (a killed worker, or
        buffered by one that let it go) and never acknowledged come back only after the
        consumer's ``ack_wait``, while new ones would come at once: taking new ones first
        would store a sensor's chunks out of order. So a partition taken with messages out
        waits for them to become due again first (redeliveries go before new messages)."""
        tries = 0
        while True:
            try:
                info = await self.worker.cluster.js.consumer_info(STREAM, f"store-{self.part}")
                break
            except Exception as exc:  # NATS away or electing: nothing is known yet
                tries += 1
                if tries in (1, 10) or tries % 100 == 0:
                    log.warning("%s: cannot read the consumer (%s); retrying", self.part,
                                str(exc)[:200] or type(exc).__name__)
                if self.stopping:
                    return
                await asyncio.sleep(min(5.0, 0.2 * tries))
        out = int(info.num_ack_pending or 0)
        if not out:
            return
        wait = min(float(info.config.ack_wait or 30.0), 600.0) + REDELIVERY_MARGIN
        # Taken again by this process while an earlier wait still ran (and so pulled
        # nothing): the messages out are the same, due at the same time.
        now = time.monotonic()
        deadline = self.worker.waits.get(self.part, 0.0)
        if deadline <= now:
            deadline = self.worker.waits[self.part] = now + wait
        log.info("%s: %d messages still out with its previous holder: waiting %.0f s for them "
                 "to come back first, so that every sensor's chunks stay in order", self.part,
                 out, deadline - time.monotonic())
        while not self.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if not self.stopping:
            self.worker.waits.pop(self.part, None)

    async def _handle(self, message: Any) -> None:
        worker = self.worker
        try:
            header = read_headers(message.subject, message.headers, self.max_parts)
        except BadMessage as exc:
            await self._refuse([message], "?", None, str(exc))
            return
        messages = [message]
        body = message.data
        if header.parts > 1:
            whole, messages, dropped = self.reassembly.add(
                header, message, body, stream_sequence=_stream_sequence(message))
            await self._give_up(dropped)
            if whole is None:
                return
            body = whole
        try:
            chunk = await asyncio.to_thread(worker.codec.decode, body, MAX_CHUNK_BYTES)
        except ValueError as exc:
            await self._refuse(messages, header.sensor, header.sequence, str(exc))
            return
        except Exception as exc:  # a defect of ours that this message brings out
            await self._failed(messages, header.sensor, header.sequence, exc)
            return
        if chunk.sensor != header.sensor or chunk.sequence != header.sequence:
            await self._refuse(messages, header.sensor, header.sequence,
                               f"the chunk is {chunk.sensor[:64]!r} {chunk.sequence}")
            return
        del body
        try:  # a full disk is retried inside, and NATS's trouble kept out of it
            added = await self._store(header.sensor, chunk, messages)
        except Exception as exc:  # a defect of ours that this message brings out
            await self._failed(messages, header.sensor, header.sequence, exc)
            return
        if added is False:
            return  # stopping before it could be stored: not acknowledged
        counters = worker.counters
        if added is None:
            counters.duplicates += 1
        else:
            counters.chunks += 1
            counters.packets += chunk.packets
            counters.bytes += added
        for each in messages:
            await each.ack()

    async def _store(self, sensor: str, chunk: Any, messages: list[Any]) -> int | None | bool:
        """The bytes stored, None for a duplicate, False when the worker stops first."""
        failed = 0
        while True:
            try:
                return await self.worker.stores.write(sensor, chunk)
            except ShuttingDown:
                return False
            except StoreError as exc:
                failed += 1
                if failed in (1, 10) or failed % 100 == 0:
                    log.error("%s: %s; trying again every %g s (%d tries)", self.part, exc,
                              STORE_RETRY, failed)
            if self.stopping:
                return False
            for each in messages:  # still working on it: not to be redelivered meanwhile
                with contextlib.suppress(Exception):
                    await each.in_progress()
            await asyncio.sleep(STORE_RETRY)

    async def _failed(self, messages: list[Any], sensor: str, sequence: int,
                      exc: Exception) -> None:
        """A message whose handling raised what it never should: tried again a little later
        (:data:`FAILED_RETRY`), and terminated, like a refused one, once delivered
        :data:`FAILED_DELIVERIES` times. Left alone it would come back after every
        ``ack_wait`` for ever (the consumers have no ``max_deliver``)."""
        delivered = max((_deliveries(each) for each in messages), default=1)
        what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if delivered >= FAILED_DELIVERIES:
            log.error("%s: chunk %d of %r failed %d times (%s): given up", self.part, sequence,
                      sensor[:128], delivered, what, exc_info=exc)
            await self._refuse(messages, sensor, sequence, f"failed {delivered} times: {what}")
            return
        log.warning("%s: chunk %d of %r failed (%s, delivery %d of %d); trying again in %g s",
                    self.part, sequence, sensor[:128], what, delivered, FAILED_DELIVERIES,
                    FAILED_RETRY)
        for each in messages:
            await each.nak(delay=FAILED_RETRY)

    async def _refuse(self, messages: list[Any], sensor: str, sequence: int | None,
                      why: str) -> None:
        """One bounded line, and the messages terminated: they leave the stream."""
        self.worker.counters.refused += 1
        log.warning("%s: refused chunk %s of %r: %s", self.part,
                    "?" if sequence is None else sequence, sensor[:128],
                    " ".join(why.split())[:300])
        for each in messages:
            await each.term()

    async def _give_up(self, dropped: list[Dropped]) -> None:
        for why, (sensor, sequence, parts), chunk in dropped:
            self.worker.counters.dropped += 1
            log.warning("%s: dropped incomplete chunk %d of %r (%d of %d parts): %s",
                        self.part, sequence, sensor[:128], len(chunk.bodies), parts, why)
            for each in chunk.messages:
                await each.ack()


def _deliveries(message: Any) -> int:
    try:
        return int(message.metadata.num_delivered)
    except Exception:  # not a JetStream delivery
        return 1


def _stream_sequence(message: Any) -> int | None:
    try:
        return int(message.metadata.sequence.stream)
    except Exception:  # not a JetStream delivery (no reply subject to read it from)
        return None


class StoreWorker:
    """Leases, one :class:`PartitionConsumer` per held partition, the stores and the report."""

    def __init__(self, settings: StoreWorkerSettings) -> None:
        self.settings = settings
        self.stores = SensorStores(settings)
        self.codec = ChunkCodec()
        self.counters = Counters()
        self.consumers: dict[str, PartitionConsumer] = {}
        #: partition -> time.monotonic() until which it waits for messages out (see
        #: PartitionConsumer._wait_for_outstanding)
        self.waits: dict[str, float] = {}
        self.cluster: Cluster | None = None  # set by run()
        self.leases: PartitionLeases | None = None
        self.max_payload = 1 << 20
        self.part_wait = PART_WAIT_SECONDS  # set from the stream's de-duplication window

    @property
    def name(self) -> str:
        return self.settings.cluster.name

    async def run(self, stop: asyncio.Event) -> None:
        """Recover, connect, then hold and consume partitions until ``stop`` is set; then
        finish the batches in hand and complete every open file."""
        await self.stores.start()  # recovers what a killed run left before anything new
        connecting = asyncio.create_task(Cluster.connect(self.settings.cluster,
                                                        manages_stream=False))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():  # stopped while waiting for NATS: nothing taken yet
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await self.stores.close()
            log.info("stopped before NATS could be reached")
            return
        self.cluster = cluster = connecting.result()
        self.max_payload = cluster.nc.max_payload or self.max_payload
        try:
            window = float((await cluster.js.stream_info(STREAM)).config.duplicate_window or 0)
            self.part_wait = max(PART_WAIT_SECONDS, min(window, 3600.0) + PART_WAIT_MARGIN)
        except Exception as exc:  # the default covers the stream's usual two minutes
            log.warning("cannot read the stream's de-duplication window: %s",
                        str(exc)[:200] or type(exc).__name__)
        self.leases = PartitionLeases(cluster.kv("ossensor-store"), self.name,
                                      self.settings.lease_seconds)
        log.info("store worker %r storing under %s (lease %g s)", self.name,
                 self.settings.data_dir, self.settings.lease_seconds)
        try:
            while not stop.is_set():
                try:
                    report = await self.report()
                    gained, lost = await self.leases.tick(report, self._stop_partition)
                except Exception as exc:  # NATS away: stop before others may take over
                    log.warning("cannot renew the leases: %s", str(exc)[:200]
                                or type(exc).__name__)
                    gained, lost = [], self.leases.fence()
                for part in lost:
                    await self._stop_partition(part)
                for part in gained:
                    self.consumers[part] = PartitionConsumer(self, part)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.tick_seconds)
            log.info("stopping: finishing the batches in hand")
            await asyncio.gather(*(self._stop_partition(p) for p in list(self.consumers)))
        finally:
            await self.stores.close()
            await cluster.close()  # drains: every acknowledgement goes out first
        log.info("stopped: %d chunks (%d packets) stored, %d duplicates, %d refused",
                 self.counters.chunks, self.counters.packets, self.counters.duplicates,
                 self.counters.refused)

    async def _stop_partition(self, part: str) -> None:
        consumer = self.consumers.pop(part, None)
        if consumer is not None:
            await consumer.stop()

    async def report(self) -> bytes:
        """``worker.<name>``: bounded (at most every partition, numbers only)."""
        assert self.cluster is not None
        js = self.cluster.js

        async def backlog(part: str) -> int:
            try:
                info = await js.consumer_info(STREAM, f"store-{part}")
                return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except Exception:  # the report goes out without it
                return -1

        parts = sorted(self.consumers)
        try:  # at once, and bounded: the renewals that follow must not wait for a slow NATS
            counts = await asyncio.wait_for(asyncio.gather(*(backlog(p) for p in parts)),
                                            timeout=self.settings.tick_seconds)
        except asyncio.TimeoutError:
            counts = [-1] * len(parts)
        pending = dict(zip(parts, counts))
        c = self.counters
        return json.dumps({
            "worker": self.name, "partitions": sorted(self.consumers), "pending": pending,
            "chunks": c.chunks, "packets": c.packets, "bytes": c.bytes,
            "duplicates": c.duplicates, "refused": c.refused, "dropped": c.dropped,
            "started": round(c.started, 3), "time": round(time.time(), 3),
        }, separators=(",", ":")).encode()
