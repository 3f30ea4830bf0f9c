"""``POST /api/v1/chunks``: a sensor's captured packets, verified, decoded and stored once.

A chunk is checked against its request (sensor, sequence, instance) before anything is kept; a
retry of a stored sequence is answered as a duplicate, so a sensor can resend whatever it is
unsure of. ``X-Ossensor-Test: 1`` (``ossensor diagnose``) checks the whole path and stores
nothing.

Where a chunk goes is the :class:`.sinks.ChunkSink`'s business: this module answers the sensor
from what the sink says (stored, duplicate, or a :class:`.sinks.SinkError` with its status and
``Retry-After``). A sink that keeps pcapng files needs the records decoded and checked here; one
that passes the body on as sent (cluster mode) needs only the head
(:meth:`~ossensor_core.wire.chunk.ChunkCodec.read_head`), which costs per chunk, not per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from ossensor_core.wire.chunk import Chunk, ChunkCodec, ChunkHead, ChunkOverLimit
from ossensor_core.wire.names import (H_CHUNK_SEQUENCE, H_INSTANCE, H_TEST,
                                      MAX_CHUNK_BYTES, MAX_CHUNK_INTERFACES, Reason)

from .answers import error_answer
from .auth import Authenticator
from .metrics import Metrics
from .registry import SensorRegistry, SensorState
from .sinks import ChunkSink, SinkError

log = logging.getLogger("ossensor_vsensor")

#: Bodies up to this size, decompressing to at most INLINE_DECODED_BYTES, have their head read
#: on the event loop: skipping through 4 MiB of records takes about half a millisecond (zstd),
#: and handing a chunk to a thread and back costs about 0.1 ms of CPU.
INLINE_HEAD_BYTES = 256 << 10
INLINE_DECODED_BYTES = 4 << 20


class ChunkReceiver:
    """Takes chunks from sensors into a :class:`.sinks.ChunkSink`, counting what happened to
    each."""

    def __init__(self, registry: SensorRegistry, auth: Authenticator, sink: ChunkSink,
                 metrics: Metrics) -> None:
        self.registry = registry
        self.auth = auth
        self.sink = sink
        self.metrics = metrics
        self.codec = ChunkCodec()

    async def receive(self, request: web.Request) -> web.Response:
        verified, body = await self.auth.authenticate(request)
        sensor = verified.sensor
        test = request.headers.get(H_TEST, "").strip() == "1"
        # A test chunk (``ossensor diagnose``) is verified and decoded, never stored: it needs
        # no registration, so a diagnosis works without disturbing a running sensor.
        if not test:
            refused = self.auth.refuse_unless_holder(sensor, request)
            if refused is not None:
                return refused
        text = request.headers.get(H_CHUNK_SEQUENCE, "")
        if not (text.isascii() and text.isdigit() and len(text) <= 20):  # a u64
            return self._refuse(sensor, None, f"missing or bad {H_CHUNK_SEQUENCE} header")
        sequence = int(text)
        # A sink that keeps the body as sent (cluster mode) needs only the head checked: the
        # records are checked by whoever decodes them (the store worker), so no work here is
        # per packet. A test chunk is always decoded whole: that is what it is for.
        whole = test or self.sink.needs_records
        decode = self.codec.decode if whole else self.codec.read_head
        try:
            chunk: Chunk | ChunkHead | None = None
            if not whole and len(body) <= INLINE_HEAD_BYTES:
                # The head of a small chunk costs less than the hop to a thread. Bounded, as
                # a few bytes of zstd can claim 64 MiB: past that, the thread decides.
                with contextlib.suppress(ChunkOverLimit):
                    chunk = decode(body, INLINE_DECODED_BYTES)
            if chunk is None:
                # Decompressing and parsing a large chunk takes a while: off the event loop.
                chunk = await asyncio.to_thread(decode, body, MAX_CHUNK_BYTES)
        except ValueError as exc:
            return self._refuse(sensor, sequence, str(exc))
        if chunk.sensor != sensor:
            return self._refuse(sensor, sequence, f"the chunk belongs to sensor "
                                                  f"{chunk.sensor[:64]!r}, not {sensor!r}")
        if chunk.sequence != sequence:
            return self._refuse(sensor, sequence, f"{H_CHUNK_SEQUENCE} {sequence} differs from "
                                                  f"the chunk's sequence {chunk.sequence}")
        # The body's instance (v2) is covered by the signature; the header, on which
        # name_in_use decided, is not. A chunk whose two disagree is refused.
        header_instance = request.headers.get(H_INSTANCE, "")
        if chunk.instance and chunk.instance != header_instance:
            return self._refuse(sensor, sequence,
                                f"the chunk belongs to instance {chunk.instance[:64]!r}, "
                                f"not {header_instance[:64]!r} ({H_INSTANCE})")
        if test:
            # A sensor checking the whole path (key, clock, TLS, chunk format) before it
            # captures: nothing is stored and the sequence is not remembered.
            self.metrics.chunks["test"] += 1
            log.info("test chunk %d from %r: %d packets verified, not stored", sequence, sensor,
                     chunk.packets)
            return web.json_response({"test": True, "packets": chunk.packets})
        state = self.registry.sensors[sensor]
        note_kernel_counters(state, chunk)
        # Shielded: should the client go away mid-write, the chunk is still stored and its
        # sequence remembered, so the sensor's retry is answered as a duplicate.
        return await asyncio.shield(self._store(state, chunk, body))

    def _refuse(self, sensor: str, sequence: int | None, detail: str) -> web.Response:
        """400 ``bad_chunk``: counted, one log line, nothing stored."""
        self.metrics.chunks["malformed"] += 1
        log.warning("refused chunk %s from %r (%s): %s",
                    "?" if sequence is None else sequence, sensor, Reason.BAD_CHUNK, detail)
        return bad_chunk(detail)

    async def _store(self, state: SensorState, chunk: Chunk | ChunkHead,
                     body: bytes) -> web.Response:
        try:
            added = await self.sink.write(state.name, chunk, body)
        except SinkError as exc:
            if exc.result is not None:
                self.metrics.chunks[exc.result] += 1
            return error_answer(exc.status, exc.detail,
                                **{"Retry-After": str(exc.retry_after)})
        if added is None:
            state.duplicates += 1
            self.metrics.chunks["duplicate"] += 1
            return web.json_response({"duplicate": True})
        state.packets += chunk.packets
        state.bytes += added
        state.chunks += 1
        self.metrics.chunks["stored"] += 1
        self.metrics.packets += chunk.packets
        self.metrics.bytes += added
        return web.json_response({"stored": chunk.packets})


def bad_chunk(detail: str) -> web.Response:
    """``400 {"error": "bad_chunk", "detail": ...}``: a chunk that fails a check; retrying
    cannot help."""
    return web.json_response({"error": Reason.BAD_CHUNK, "detail": detail}, status=400)


def note_kernel_counters(state: SensorState, chunk: Chunk | ChunkHead) -> None:
    """Kernel counters from a v2 chunk's interface table. They only move forward: a chunk
    that waited in a spool carries older counters than the last heartbeat, which stays
    authoritative (it also resets them when a capture was reopened). New names stop at
    MAX_CHUNK_INTERFACES, so chunks with ever new names cannot grow the table without end."""
    for row in chunk.interfaces:
        known = state.kernel.get(row.name)
        if known is None and len(state.kernel) >= MAX_CHUNK_INTERFACES:
            continue
        if known is None or (row.packets >= known.get("packets", 0)
                             and row.drops >= known.get("drops", 0)):
            state.kernel[row.name] = {"packets": row.packets, "drops": row.drops}
