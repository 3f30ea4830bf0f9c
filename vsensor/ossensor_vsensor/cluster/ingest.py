"""A replica's chunk sink: every accepted chunk into the stream, acknowledged once replicated.

:class:`JetStreamSink` is the :class:`~ossensor_vsensor.sinks.ChunkSink` of cluster mode. The
body goes into ``OSSENSOR_CHUNKS`` exactly as the sensor sent it (still compressed, never
decoded here beyond its head), on the subject and with the headers of the package docstring.
JetStream's PubAck comes once the stream's leader has the message on a quorum of its copies, so
"stored" to the sensor means "survives the loss of any minority of NATS servers"; nothing is
written to the replica's own disk.

What the sensor is told:

- every part acknowledged: ``stored``; every part acknowledged as a duplicate (its
  ``Nats-Msg-Id`` seen within the stream's duplicate window): ``duplicate``;
- the stream is full (``discard: new`` refuses the message): :class:`SinkFull` (``507``);
- anything else (no JetStream quorum, a leader election, no connection, a timeout):
  :class:`SinkUnavailable` (``503``). The sensor keeps the chunk and sends it again; parts that
  did reach the stream are recognised by their ``Nats-Msg-Id`` then, so a retry adds only what
  is missing. A publish that timed out may still be stored later (nats-py sends what it
  buffered during a reconnect): the retry then finds it as a duplicate.

An acknowledgement counts only when it names the stream and a sequence: a publish is a NATS
request, and any client allowed to subscribe to the chunk subjects could answer it (NATS
permissions should keep them to replicas; readers use JetStream consumers).

A body over the server's ``max_payload`` (read from the connection each time: a reconnect may
reach a server with another setting) goes in parts of ``max_payload`` minus room for headers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from ossensor_core.wire.chunk import Chunk, ChunkHead

from ..sinks import SinkFull, SinkUnavailable
from . import H_MSG_ID, H_PART, H_SENSOR, H_SEQUENCE, STREAM, SUBJECT_PREFIX, partition
from .connection import Cluster, ClusterSettings
from .names import token

log = logging.getLogger("ossensor_vsensor.cluster")

#: Room left in every message for its headers (the longest set is about 750 bytes: a 253-byte
#: name and its 406-character token, a 20-digit sequence, the part, the expected stream).
HEADER_ROOM = 4096
#: A server whose max_payload leaves less than this per part is refused at start: a 64 MiB
#: chunk would go in thousands of messages.
MIN_PART_BYTES = 60 * 1024
#: Parts of one chunk in flight at once (each up to max_payload in the client's buffer).
PARTS_IN_FLIGHT = 8
#: JetStream error codes that mean the stream cannot take more until it drains: 10077 is
#: "maximum bytes/messages exceeded" (the stream's limits, ``discard: new``), 10023
#: "insufficient resources" (the servers' JetStream storage).
FULL_CODES = frozenset({10077, 10023})
#: At most one warning per this many seconds while publishing fails (every chunk of every
#: sensor fails the same way during an outage).
WARN_EVERY = 10.0


class ForeignAcknowledgement(Exception):
    """The answer to a publish did not come from the chunk stream."""


class JetStreamSink:
    """Chunks into ``OSSENSOR_CHUNKS`` (see the module docstring)."""

    needs_records = False

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.cluster: Cluster | None = None
        self._closed = False
        self._warned = -math.inf
        self.parts_published = 0  # messages acknowledged, parts of split chunks included

    def bind(self, cluster: Cluster) -> None:
        """The connection to publish on (made at the application's start)."""
        self.cluster = cluster

    async def start(self) -> None:
        if self.cluster is None:
            raise RuntimeError("JetStreamSink.start before bind(cluster)")
        self._part_bytes()  # refuse a server that could not take reasonable parts

    async def close(self) -> None:
        self._closed = True

    def _part_bytes(self) -> int:
        assert self.cluster is not None
        size = int(self.cluster.nc.max_payload) - HEADER_ROOM
        if size < MIN_PART_BYTES:
            raise RuntimeError(f"the NATS server's max_payload ({self.cluster.nc.max_payload} "
                               f"bytes) is too small for chunks; cluster mode needs at least "
                               f"{MIN_PART_BYTES + HEADER_ROOM} (docs/cluster.md)")
        return size

    async def write(self, sensor: str, chunk: Chunk | ChunkHead, body: bytes) -> int | None:
        if self._closed:
            raise SinkUnavailable("the vSensor is shutting down", result=None)
        if self.cluster is None:
            raise SinkUnavailable("the vSensor is not connected to its cluster yet")
        sequence = chunk.sequence
        name = token(sensor)
        subject = f"{SUBJECT_PREFIX}.{partition(sensor)}.{name}"
        headers = {H_SENSOR: sensor, H_SEQUENCE: str(sequence)}
        try:
            size = self._part_bytes()
        except RuntimeError as exc:  # reconnected to a server configured otherwise
            self._warn(str(exc))
            raise SinkUnavailable("the vSensor's cluster cannot take chunks now") from None
        count = max(1, -(-len(body) // size))
        if count == 1:
            messages = [(body, {**headers, H_MSG_ID: f"{name}.{sequence}"})]
        else:
            view = memoryview(body)
            messages = [(bytes(view[i * size:(i + 1) * size]),
                         {**headers, H_PART: f"{i + 1}/{count}",
                          H_MSG_ID: f"{name}.{sequence}.{i + 1}"}) for i in range(count)]
        duplicates = 0
        for start in range(0, count, PARTS_IN_FLIGHT):
            window = messages[start:start + PARTS_IN_FLIGHT]
            results = await asyncio.gather(*(self._publish(subject, data, h)
                                             for data, h in window), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise self._refusal(sensor, sequence, result) from result
                duplicates += bool(result)
        return None if duplicates == count else len(body)

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> bool:
        """Publish one message; whether JetStream found it a duplicate."""
        assert self.cluster is not None
        try:
            ack: Any = await self.cluster.js.publish(subject, data,
                                                     timeout=self.settings.publish_timeout,
                                                     stream=STREAM, headers=headers)
        except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a PubAck's
            raise ForeignAcknowledgement(f"an answer that is not JetStream's ({exc})"[:200]) \
                from exc
        # Any client allowed to subscribe to the subject can answer the request; only an
        # acknowledgement naming our stream and a sequence counts (docs/cluster.md: NATS
        # permissions keep the chunk subjects to replicas and JetStream).
        if ack.stream != STREAM or not isinstance(ack.seq, int) or ack.seq < 1:
            raise ForeignAcknowledgement(f"an answer that is not JetStream's: stream "
                                         f"{str(ack.stream)[:64]!r}, sequence "
                                         f"{str(ack.seq)[:32]!r}")
        self.parts_published += 1
        return ack.duplicate is True

    def _refusal(self, sensor: str, sequence: int, exc: BaseException) -> Exception:
        """The :class:`SinkError` for a failed publish, and a warning now and then."""
        import nats.errors
        import nats.js.errors

        if isinstance(exc, nats.js.errors.APIError) and exc.err_code in FULL_CODES:
            self._warn(f"the chunk stream is full ({exc.description}): answering 507 until "
                       f"the store workers catch up (chunk {sequence} of {sensor!r})")
            return SinkFull("the vSensor's chunk stream is full")
        if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
            what = f"no acknowledgement within {self.settings.publish_timeout:g} s"
        elif isinstance(exc, nats.js.errors.APIError):
            what = f"JetStream error {exc.err_code}: {exc.description}"
        elif isinstance(exc, nats.errors.Error | OSError | ForeignAcknowledgement):
            what = str(exc) or type(exc).__name__
        else:  # a bug, not an outage: keep its traceback
            log.error("publishing chunk %d of %r failed", sequence, sensor, exc_info=exc)
            return SinkUnavailable("the vSensor cannot store chunks now")
        self._warn(f"cannot publish chunk {sequence} of {sensor!r} ({what}); answering 503")
        return SinkUnavailable("the vSensor's cluster cannot store chunks now")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("%s", message)
