"""The https transport's sender: it accepts chunks, queues them (memory, then the spool) and
delivers them in order; the package docstring describes the behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from pathlib import Path

from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.client import ENV_TLS_VERIFY, VSensorTls, load_instance
from ossensor_core.errors import TransportError
from ossensor_core.runtime.logsetup import level
from ossensor_core.pipeline.contracts import (Chunk, ChunkEncoder, SensorControl, Transport,
                                              TransportStats)
from ossensor_core.pipeline.sensor import SHUTDOWN_GRACE_SECONDS
from ossensor_core.wire.names import H_CHUNK_SEQUENCE, H_INSTANCE
from ossensor_core.wire.signing import content_digest

from .answers import Backoff, OnceLog, Refused, reason_of, state_of
from .connection import VSensorConnection
from .filters import VSensorFilter, own_exclusion
from .registration import Registration, failure_message
from .split import part_sequences, split_chunk
from .spool import QueuedChunk, Spool

log = logging.getLogger(__package__)  # one logger for the whole transport

#: Kept free at the end of the shutdown grace for spooling, closing and the process exit.
SHUTDOWN_MARGIN_SECONDS = 2.0


class HttpsTransport(Transport):
    """Ships chunks to one vSensor; see the package docstring for the behaviour."""

    name = "https"

    def __init__(self, host: str, port: int, key: str, sensor: str, encoder: ChunkEncoder, *,
                 ca_file: str = "", fingerprint: str = "", tls_verify: bool = True,
                 spool_dir: str = "", spool_bytes: int = 256 << 20, memory_chunks: int = 64,
                 memory_bytes: int = 16 << 20,
                 timeout_seconds: float = 10.0, grace_seconds: float = 25.0,
                 backoff_min: float = 0.5, backoff_max: float = 30.0) -> None:
        self.tls = VSensorTls(ca_file, fingerprint, tls_verify)
        self.fingerprint = self.tls.pin  # normalised; a malformed one raises ValueError here
        self.tls_verify = tls_verify
        self.sensor = sensor
        self.encoder = encoder
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self.spool_bytes = spool_bytes
        self.memory_chunks = memory_chunks
        self.memory_bytes = memory_bytes
        self.timeout_seconds = timeout_seconds
        self.grace_seconds = grace_seconds
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.media_type = encoder.media_type

        self.chunks_sent = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.chunks_spooled = 0
        self.chunks_dropped = 0
        self.packets_dropped = 0
        self.chunks_duplicate = 0  # included in chunks_sent: stored by an earlier attempt
        self.spool_full_chunks = 0  # included in chunks_dropped: the spool limit dropped them
        self.spool_full_packets = 0
        self.reregistrations = 0  # after a 409 (the vSensor forgot us)
        self.chunk_retries = 0  # deliveries that failed and will be tried again
        self.chunks_split = 0  # refused as too large (413) and sent again in two parts
        self.records_too_large = 0  # included in chunks_dropped: a single record got a 413
        self._part_sequences = part_sequences()

        self._report = OnceLog(log)
        self.connection = VSensorConnection(host, port, key, sensor, self.tls, timeout_seconds)
        self.base_url = self.connection.base_url
        self.filter = VSensorFilter()
        self.registration = Registration(
            self.connection, self.filter, encoder.versions, self._report,
            spool_full=lambda: (self.spool_full_chunks, self.spool_full_packets),
            spool_dir=self.spool_dir, backoff_min=backoff_min, backoff_max=backoff_max)
        self.spool = Spool(self.spool_dir, spool_bytes) if self.spool_dir is not None else None

        self._memory: deque[QueuedChunk] = deque()
        self._order = 0
        self._lock = asyncio.Lock()  # moves between memory and spool vs. taking the next chunk
        self._wakeup = asyncio.Event()  # a chunk was queued, or we are closing
        self._room = asyncio.Event()  # the sender took a chunk out of memory
        self._task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._in_flight: QueuedChunk | None = None
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:  # never the key
        return (f"HttpsTransport({self.base_url!r}, sent={self.chunks_sent}, "
                f"queued={self.queued_chunks})")

    # -- what others read -------------------------------------------------------------------

    @property
    def instance(self) -> str:
        """This process's instance id (kept in the spool folder when there is one)."""
        return self.connection.instance

    @property
    def registered(self) -> bool:
        return self.registration.registered

    @property
    def chunk_version(self) -> int:
        """The chunk format version sent (see ``Registration.chunk_version``)."""
        return self.registration.chunk_version

    @chunk_version.setter
    def chunk_version(self, version: int) -> None:
        self.registration.chunk_version = version

    @property
    def workloads(self) -> list[str]:
        return self.registration.workloads

    @property
    def vsensor_filter(self) -> str | None:
        """The vSensor's filter applied last."""
        return self.filter.expression

    @property
    def peer_ranges(self) -> AddressSet | None:
        """The peer exclusion applied last, with the vSensor's id of it."""
        return self.filter.peers

    @property
    def peer_ranges_id(self) -> str | None:
        return self.filter.peers_id

    @property
    def queued_chunks(self) -> int:
        """Chunks accepted and not yet delivered (memory and spool)."""
        return len(self._memory) + self.spooled_chunks

    @property
    def spooled_chunks(self) -> int:
        """Chunks in the spool folder now."""
        return len(self.spool) if self.spool is not None else 0

    @property
    def spooled_bytes(self) -> int:
        """Bytes of the chunks in the spool folder now."""
        return self.spool.size if self.spool is not None else 0

    @property
    def memory_queued_bytes(self) -> int:
        """Encoded bytes of the chunks queued in memory now."""
        return sum(entry.size for entry in self._memory)

    @property
    def close_budget(self) -> float:
        """How long ``aclose`` keeps delivering: the shutdown grace minus the core's wait for its
        sender (before it calls ``aclose``) and a margin for spooling and exiting; at least 1 s
        (or the whole grace when it is shorter)."""
        return max(self.grace_seconds - SHUTDOWN_GRACE_SECONDS - SHUTDOWN_MARGIN_SECONDS,
                   min(1.0, self.grace_seconds))

    def stats(self) -> TransportStats:
        return TransportStats(
            chunks_sent=self.chunks_sent, packets_sent=self.packets_sent,
            bytes_sent=self.bytes_sent, chunks_spooled=self.chunks_spooled,
            chunks_dropped=self.chunks_dropped, packets_dropped=self.packets_dropped,
            reregistrations=self.reregistrations, chunk_retries=self.chunk_retries,
            queued_chunks=self.queued_chunks, memory_queued_bytes=self.memory_queued_bytes,
            spooled_chunks=self.spooled_chunks, spooled_bytes=self.spooled_bytes,
            registered=self.registered)

    # -- the Transport interface ------------------------------------------------------------

    async def start(self, control: SensorControl) -> None:
        self.registration.control = self.filter.control = control
        self.filter.set_own(await own_exclusion(self.connection.host, self.connection.port))
        if self.spool is not None:
            await asyncio.to_thread(self._load_spool)
            self.connection.instance = await asyncio.to_thread(load_instance, self.spool.folder)
        tls = self.connection.open()
        if tls is False:
            log.warning("%s is false: the vSensor's certificate is not verified, so the "
                        "connection to %s is not authenticated (anyone in the path can pose as "
                        "the vSensor and read the captured traffic)", ENV_TLS_VERIFY,
                        self.base_url)
        ca_file = self.tls.ca_file
        log.info("sending chunks to the vSensor at %s (%s%s)", self.base_url,
                 f"pinned certificate {self.fingerprint[:16]}..." if self.fingerprint
                 else "certificate not verified" if tls is False
                 else f"CA file {ca_file}" if ca_file else "system CAs",
                 f", spool {self.spool_dir}" if self.spool_dir else ", no spool folder")
        self._task = asyncio.create_task(self._run(), name="https transport")
        self._task.add_done_callback(self._sender_ended)

    async def send(self, chunk: Chunk) -> None:
        if self._closing:
            raise TransportError("the https transport is closed")
        # Encoding and hashing release the GIL: in a thread, beside the capture loop.
        payload, digest = await asyncio.to_thread(self._encode, chunk)
        self._order += 1
        entry = QueuedChunk(self._order, chunk.sequence, chunk.packets, len(payload), payload,
                            digest=digest)
        # Accepted from here on: a cancelled wait below leaves it queued, and aclose keeps it.
        self._memory.append(entry)
        self._wakeup.set()
        while self._memory_full() and not self._closing:
            if self.spool is not None and await self._spill_oldest():
                continue
            self._room.clear()
            await self._room.wait()

    def refresh(self) -> None:
        """Send the next heartbeat (which brings the vSensor's filter) now."""
        self.registration.refresh()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._wakeup.set()
        self._room.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        deadline = time.monotonic() + self.close_budget
        while (self.queued_chunks or self._in_flight is not None) \
                and time.monotonic() < deadline and self._task is not None \
                and not self._task.done():
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._memory:
            if self.spool is not None:
                while self._memory:
                    if not await self._spill_oldest():
                        break
            if self._memory:
                packets = sum(e.packets for e in self._memory)
                log.error("%d chunks (%d packets) not delivered to the vSensor at %s are lost "
                          "at shutdown%s", len(self._memory), packets, self.base_url,
                          "" if self.spool_dir is None else " (the spool folder failed)")
                self.chunks_dropped += len(self._memory)
                self.packets_dropped += packets
                self._memory.clear()
        if self.spooled_chunks:
            log.warning("%d chunks (%d bytes) stay in the spool %s for the next run",
                        self.spooled_chunks, self.spooled_bytes, self.spool_dir)
        if self.connection.is_open and self.registered:
            await self.registration.say_goodbye()
        await self.connection.aclose()
        log.info("https transport closed: %d chunks, %d packets, %d bytes sent; %d spooled, "
                 "%d dropped (%d of them because the spool was full)", self.chunks_sent,
                 self.packets_sent, self.bytes_sent, self.chunks_spooled, self.chunks_dropped,
                 self.spool_full_chunks)

    # -- encoding ---------------------------------------------------------------------------

    def _encode(self, chunk: Chunk) -> tuple[bytes, tuple[str, str]]:
        version = self.chunk_version
        if version == 1:  # what every encoder writes
            payload = self.encoder.encode(chunk)
        else:
            # The instance id is ours: stamped here, the body names the same instance as the
            # X-Ossensor-Instance header of every attempt (the spool keeps both across runs).
            chunk = dataclasses.replace(chunk, instance=self.instance)
            payload = self.encoder.encode(chunk, version=version)
        algorithm = self.connection.digest
        return payload, (algorithm, content_digest(payload, algorithm))

    def _reencode(self, payload: bytes) -> bytes:
        chunk = self.encoder.decode(payload)
        if self.chunk_version == 1:
            return self.encoder.encode(chunk)
        return self.encoder.encode(chunk, version=self.chunk_version)

    # -- the memory queue and the spool -----------------------------------------------------

    def _memory_full(self) -> bool:
        return len(self._memory) > self.memory_chunks or (
            len(self._memory) > 1 and sum(e.size for e in self._memory) > self.memory_bytes)

    def _take(self) -> QueuedChunk | None:
        """The oldest queued chunk (spool and memory), removed while it is in flight."""
        spool = self.spool
        if spool is not None and spool.entries and (
                not self._memory or spool.entries[0].order < self._memory[0].order):
            return spool.pop_oldest()
        if self._memory:
            entry = self._memory.popleft()
            self._room.set()
            return entry
        return None

    def _put_back(self, entry: QueuedChunk) -> None:
        if entry.path is not None and self.spool is not None:
            self.spool.insert(entry)
        else:
            self._memory.appendleft(entry)

    def _forget(self, entry: QueuedChunk) -> None:
        if self.spool is not None:
            self.spool.remove(entry)

    def _count_drop(self, entry: QueuedChunk) -> None:
        self.chunks_dropped += 1
        self.packets_dropped += entry.packets

    async def _spill_oldest(self) -> bool:
        """Move the oldest chunk in memory to the spool; False when the spool cannot take it."""
        spool = self.spool
        assert spool is not None
        async with self._lock:
            if not self._memory:
                return True
            entry = self._memory.popleft()
            try:
                path = await asyncio.to_thread(spool.write, entry)
            except OSError as exc:
                self._memory.appendleft(entry)
                self._report("spool", "failed", f"cannot write to the spool {self.spool_dir} "
                             f"({exc.strerror or exc}); keeping chunks in memory")
                return False
            except BaseException:
                self._memory.appendleft(entry)
                raise
            self._report("spool", "ok", f"the spool {self.spool_dir} works again")
            spool.add(entry, path)
            self.chunks_spooled += 1
            self._enforce_spool_limit()
            return True

    def _enforce_spool_limit(self) -> None:
        assert self.spool is not None
        for oldest in self.spool.over_limit():
            self._count_drop(oldest)
            self.spool_full_chunks += 1
            self.spool_full_packets += oldest.packets
            log.error("spool %s is full (%d bytes allowed): dropped the oldest chunk %d "
                      "(%d packets); %d chunks dropped so far", self.spool_dir, self.spool_bytes,
                      oldest.sequence, oldest.packets, self.chunks_dropped)

    def _load_spool(self) -> None:
        """Queue the chunks an earlier run left in the spool, oldest first (blocking)."""
        assert self.spool is not None

        def next_order() -> int:
            self._order += 1
            return self._order

        self.spool.load(next_order)
        self._enforce_spool_limit()

    # -- delivering -------------------------------------------------------------------------

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the https sender stopped: %r; chunks are kept until shutdown",
                      task.exception(), exc_info=task.exception())

    async def _run(self) -> None:
        await self.registration.until_done()
        if not self._closing:
            self._heartbeat = asyncio.create_task(self.registration.heartbeats(),
                                                  name="https heartbeat")
        await self._send_forever()

    async def _send_forever(self) -> None:
        backoff = Backoff(self.backoff_min, self.backoff_max)
        conflicts = 0  # 409s since the last delivery
        while True:
            async with self._lock:
                entry = self._take()
            if entry is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._in_flight = entry
            try:
                delivered = await self._deliver(entry)
            except Refused as answer:
                self._put_back(entry)
                self.chunk_retries += 1
                if self.connection.direct_failed(answer):
                    await self.registration.until_done()
                    continue
                if answer.status == 409:  # the vSensor forgot us (it restarted): register again
                    self._report("chunks", answer.state, f"the vSensor at {self.base_url} does "
                                 f"not know this sensor ({answer}); registering again, "
                                 f"{self.queued_chunks} chunks kept", logging.WARNING)
                    conflicts += 1
                    if conflicts > 1:  # 409 again right after registering: do not hammer it
                        await asyncio.sleep(backoff.next(answer.retry_after))
                    self.reregistrations += 1
                    await self.registration.until_done()
                    continue
                self._report("chunks", answer.state, failure_message(
                    answer, "cannot deliver chunks to", self.base_url,
                    f"{self.queued_chunks} chunks kept, retrying"))
                await asyncio.sleep(backoff.next(answer.retry_after))
                continue
            except BaseException:
                self._put_back(entry)
                raise
            finally:
                self._in_flight = None
            backoff.reset()
            conflicts = 0
            self._forget(entry)
            if not delivered:
                continue
            self._report("chunks", "ok", f"the vSensor at {self.base_url} takes chunks again "
                         f"({self.queued_chunks} queued)")

    async def _deliver(self, entry: QueuedChunk) -> bool:
        """POST one chunk; True when stored, False when refused for good (400)."""
        payload = entry.payload
        if payload is None:
            assert entry.path is not None
            try:
                payload = await asyncio.to_thread(entry.path.read_bytes)
            except OSError as exc:
                log.error("cannot read spooled chunk %s (%s); %d packets lost", entry.path,
                          exc.strerror or exc, entry.packets)
                self._count_drop(entry)
                return False
        digest = entry.digest
        if len(payload) > 4 and payload[4] > self.chunk_version:
            # Encoded for a vSensor that read a newer format; this one (a rollback) does not.
            payload = await asyncio.to_thread(self._reencode, payload)
            digest = None
        headers = {"Content-Type": self.media_type, H_CHUNK_SEQUENCE: str(entry.sequence),
                   H_INSTANCE: self.instance}
        status, text, retry_after = await self.connection.post_chunk(payload, headers, digest)
        log.log(level(2), "chunk %d: %d packets, %d bytes -> %d", entry.sequence, entry.packets,
                len(payload), status)
        if status == 200:
            if '"duplicate"' in text:
                self.chunks_duplicate += 1
            self.chunks_sent += 1
            self.packets_sent += entry.packets
            self.bytes_sent += len(payload)
            return True
        reason = reason_of(text)
        if status == 413:
            return await self._split(entry, payload, reason)
        if status == 400:
            log.error("the vSensor refused chunk %d as malformed (%s); dropped its %d packets",
                      entry.sequence, reason, entry.packets)
            self._count_drop(entry)
            return False
        raise Refused(state_of(status), f"HTTP {status} ({reason})", retry_after, status)

    async def _split(self, entry: QueuedChunk, payload: bytes, reason: str) -> bool:
        """A 413: the chunk's halves take its place (``split.py``), or its single record goes."""
        sequences = (next(self._part_sequences), next(self._part_sequences))
        try:
            parts = await asyncio.to_thread(split_chunk, self.encoder, payload,
                                            self.chunk_version, sequences)
        except ValueError as exc:  # our own bytes, so never expected: still no blocked queue
            parts, reason = None, f"{reason}; it does not decode: {exc}"
        if parts is None:
            log.error("the vSensor refused chunk %d as too large (HTTP 413: %s) and it holds a "
                      "single record of %d bytes, which cannot be split: dropped %d packets",
                      entry.sequence, reason, len(payload), entry.packets)
            self._count_drop(entry)
            self.records_too_large += 1
            return False
        algorithm = self.connection.digest
        queued = [QueuedChunk(entry.order, sequence, packets, len(data), data,
                              digest=(algorithm, content_digest(data, algorithm)))
                  for sequence, packets, data in parts]
        paths: list[Path] = []  # from the spool: so are its parts, before the original goes
        try:
            while entry.path is not None and self.spool is not None and len(paths) < 2:
                paths.append(await asyncio.to_thread(self.spool.write, queued[len(paths)]))
        except OSError as exc:
            log.warning("cannot spool the parts of chunk %d (%s); they stay in memory",
                        entry.sequence, exc.strerror or exc)
        except BaseException:  # cancelled: the original is put back, its parts go
            for path in paths:
                path.unlink(missing_ok=True)
            raise
        for part, path in zip(queued, paths):
            self.spool.add(part, path)  # type: ignore[union-attr]  # paths only with a spool
        self._memory.extendleft(reversed(queued[len(paths):]))
        self.chunks_split += 1
        log.warning("the vSensor refused chunk %d (%d packets, %d bytes) as too large (HTTP 413: "
                    "%s): sending it again in two parts, chunks %d and %d", entry.sequence,
                    entry.packets, len(payload), reason, *(p[0] for p in parts))
        return False
