"""Where accepted chunks go: the one interface between ``POST /api/v1/chunks`` and storage.

:class:`.chunks.ChunkReceiver` authenticates a chunk, checks it against its request and hands
it to a :class:`ChunkSink`; it knows nothing else about storage. Single mode's sink is
:class:`LocalSink` (pcapng files in the data folder, :mod:`.stores`); cluster mode's is
:class:`.cluster.ingest.JetStreamSink` (the chunk as the sensor sent it, into a replicated
stream). Another engine (Kafka, object storage) is one more class with these four members.

A sink answers in one of three ways, which the receiver turns into the protocol's answers:
stored (``200 {"stored": packets}``), a duplicate of a sequence stored before
(``200 {"duplicate": true}``), or a :class:`SinkError`: :class:`SinkUnavailable` (``503``)
or :class:`SinkFull` (``507``), both with ``Retry-After``, after which the sensor keeps the
chunk and sends it again. A sink never answers "stored" for what it could lose.
"""

from __future__ import annotations

import errno
import logging
from typing import Protocol

from ossensor_core.wire.chunk import Chunk, ChunkHead

from .store import StoreError
from .stores import SensorStores, ShuttingDown

log = logging.getLogger("ossensor_vsensor")

#: What a sensor is told to wait before it sends a refused chunk again.
RETRY_AFTER_SECONDS = 5


class SinkError(Exception):
    """Nothing was stored; the sensor should send the chunk again after ``retry_after``
    seconds. ``detail`` goes to the sensor: never a secret, never a path."""

    status = 503

    def __init__(self, detail: str, retry_after: int = RETRY_AFTER_SECONDS,
                 result: str | None = "unavailable") -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        #: The ``ossensor_vsensor_chunks_total`` result it counts as (None: not counted).
        self.result = result


class SinkUnavailable(SinkError):
    """503: storage cannot be reached now (shutting down, no quorum, a timeout)."""


class SinkFull(SinkError):
    """507: storage refuses more until it drains or is cleaned (disk or stream full)."""

    status = 507

    def __init__(self, detail: str, retry_after: int = RETRY_AFTER_SECONDS,
                 result: str | None = "failed") -> None:
        super().__init__(detail, retry_after, result)


class ChunkSink(Protocol):
    """Where :class:`.chunks.ChunkReceiver` puts chunks."""

    #: True when :meth:`write` needs the decoded records (``Chunk``); False when the body
    #: as sent is enough and the receiver checks only the head (``ChunkHead``), leaving
    #: the records to whoever decodes the body later.
    needs_records: bool

    async def start(self) -> None:
        """Called once before the first chunk (the application's start-up)."""

    async def write(self, sensor: str, chunk: Chunk | ChunkHead, body: bytes) -> int | None:
        """Store the chunk of ``sensor`` (``body`` is its encoding as sent, ``chunk`` what
        it says, already checked against the request): the bytes stored, or None when its
        sequence was stored before. Raises :class:`SinkError` when nothing was stored."""

    async def close(self) -> None:
        """Called once at shutdown; a chunk written after it gets :class:`SinkUnavailable`."""


class LocalSink:
    """Single mode: pcapng files per sensor in the data folder (:class:`.stores.SensorStores`),
    a retry found in the sensor's journal of stored sequences."""

    needs_records = True

    def __init__(self, stores: SensorStores) -> None:
        self.stores = stores

    async def start(self) -> None:
        await self.stores.start()

    async def write(self, sensor: str, chunk: Chunk | ChunkHead, body: bytes) -> int | None:
        assert isinstance(chunk, Chunk)  # needs_records: the receiver decoded it
        try:
            return await self.stores.write(sensor, chunk)
        except ShuttingDown:
            raise SinkUnavailable("the vSensor is shutting down", result=None) from None
        except StoreError as exc:
            log.error("%s (%s); answering 507", exc,
                      errno.errorcode.get(exc.errno or 0, "no errno"))
            raise SinkFull(f"the vSensor cannot store chunks now: "
                           f"{_short_reason(exc.errno)}") from exc

    async def close(self) -> None:
        await self.stores.close()


def _short_reason(code: int | None) -> str:
    return {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "data folder not writable", errno.EPERM: "data folder not writable",
            errno.EROFS: "data folder is read-only",
            errno.EEXIST: "data folder not usable",
            errno.ENOTDIR: "data folder not usable"}.get(code or 0, "storage error")
