"""The chunk wire format, ``ossensor-chunk`` versions 1 and 2 (docs/architecture.md).

A chunk carries whole batches in their TPACKET_V3 record layout, so encoding costs one copy and
one compression per chunk, never work per packet. Layout (little-endian)::

    magic "OSCK" | u8 version (1, 2) | u8 codec (0 none, 1 zstd) | u16 reserved | u32 body length
    body (compressed with the codec):
      u64 sequence | u64 created_ns | u16 len + sensor name (UTF-8)
      v2 only: u16 len + instance id (UTF-8) | u32 interface count
               per interface: u16 len + name | u32 ifindex | u16 link type
                              | u64 kernel packets | u64 kernel drops (cumulative)
      u32 batch count
      per batch: u16 len + interface name | u32 ifindex | u16 link type | u32 packets
                 | u32 data length | data (records, each starting with struct tpacket3_hdr)

``encode`` writes version 1 unless asked for another (every vSensor reads 1; the https transport
asks for the highest version the vSensor lists in ``chunk_versions`` at registration);
``decode`` reads both, as the header's version byte says.
"""

from __future__ import annotations

import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import zstandard

from ossensor_core.capture.batch import TPACKET3_HDR, PacketBatch
from ossensor_core.wire.names import (CHUNK_MEDIA_TYPE, MAX_CHUNK_BATCHES, MAX_CHUNK_BYTES,
                                      MAX_CHUNK_INTERFACES, MAX_CHUNK_LINKTYPES, MAX_WIRE_LENGTH,
                                      MAX_ZSTD_WINDOW, SNAPLEN)

MAGIC = b"OSCK"
VERSION = 1  # what encode writes by default
VERSIONS: tuple[int, ...] = (1, 2)  # what this module writes and reads
CODEC_NONE = 0
CODEC_ZSTD = 1
MEDIA_TYPE = CHUNK_MEDIA_TYPE

_OUTER = struct.Struct("<4sBBHI")
_HEAD = struct.Struct("<QQ")
_BATCH = struct.Struct("<IHII")
_INTERFACE = struct.Struct("<IHQQ")


def _name(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack("<H", len(encoded)) + encoded


@dataclass(frozen=True)
class InterfaceCounters:
    """One row of a chunk's interface table: a captured interface and its cumulative kernel
    counters (:class:`CaptureStats`) when the chunk was cut."""

    name: str
    ifindex: int
    linktype: int
    packets: int = 0
    drops: int = 0


@dataclass(frozen=True)
class Chunk:
    """Batches cut together by size or time, the unit that a transport stores or sends.

    ``instance`` (the sending process, stamped by the transport that has one) and
    ``interfaces`` (every interface captured when the chunk was cut, with or without batches
    here) travel in chunk format v2 only; v1 leaves them empty.
    """

    sensor: str
    sequence: int
    batches: tuple[PacketBatch, ...]
    created_ns: int
    instance: str = ""
    interfaces: tuple[InterfaceCounters, ...] = ()
    packets: int = field(init=False)
    record_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packets", sum(b.count for b in self.batches))
        object.__setattr__(self, "record_bytes", sum(len(b.data) for b in self.batches))


class ChunkEncoder(ABC):
    """Turns a chunk into bytes for the wire (and back, for the receiving side).

    ``versions`` lists the versions of ``ossensor-chunk`` that ``encode`` can write; the
    transport asks for the highest one the vSensor also reads.
    """

    media_type: str = CHUNK_MEDIA_TYPE
    versions: tuple[int, ...] = (1,)

    @abstractmethod
    def encode(self, chunk: Chunk, version: int = 1) -> bytes:
        """Serialise and compress a chunk in format ``version``. Pure: no I/O."""

    @abstractmethod
    def decode(self, payload: bytes) -> Chunk:
        """The inverse of :meth:`encode`; raises ValueError on a malformed payload."""



class ChunkCodec(ChunkEncoder):
    """Encodes chunks with zstd at level -3 by default (one of zstd's fast levels: on ring
    records of 64-byte UDP frames with random payloads it compressed to 0.24 at about 0.12 us
    per packet here, against 0.23 at 0.22 us for level 1).

    Compression pays only when the traffic compresses. When a chunk does not shrink to
    ``worth`` of its size (TLS, random payloads), the codec sends chunks uncompressed for
    ``backoff`` seconds, then tries again; every failed try doubles the pause (up to
    ``max_backoff``), a successful one resets it. So incompressible traffic costs one
    compression now and then, not one per chunk. Not thread-safe: one encode at a time.
    """

    media_type = MEDIA_TYPE
    versions = VERSIONS

    def __init__(self, level: int = -3, compress: bool = True, worth: float = 0.7,
                 backoff: float = 1.0, max_backoff: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.compress = compress
        self.worth = worth
        self.min_backoff = backoff
        self.max_backoff = max_backoff
        self._clock = clock
        self._backoff = backoff
        self._paused_until = 0.0
        # Levels over 19 would use windows past what a receiver allocates (MAX_ZSTD_WINDOW).
        params = zstandard.ZstdCompressionParameters.from_level(level)
        cap = MAX_ZSTD_WINDOW.bit_length() - 1
        self._compressor = (zstandard.ZstdCompressor(level=level) if params.window_log <= cap
                            else zstandard.ZstdCompressor(
                                compression_params=zstandard.ZstdCompressionParameters.from_level(
                                    level, window_log=cap)))
        self.compressed = 0  # chunks sent compressed
        self.uncompressed = 0  # chunks sent as they are (paused, or not worth it)
        self.attempts_wasted = 0  # compressions thrown away because they saved too little

    @property
    def paused(self) -> bool:
        """True while compression is paused after incompressible traffic."""
        return self._clock() < self._paused_until

    def encode(self, chunk: Chunk, version: int = VERSION) -> bytes:
        """``version`` 1 leaves out the instance and the interface table (any vSensor reads
        it); 2 carries them."""
        parts = [_HEAD.pack(chunk.sequence, chunk.created_ns), _name(chunk.sensor)]
        if version == 2:
            parts += [_name(chunk.instance), struct.pack("<I", len(chunk.interfaces))]
            for row in chunk.interfaces:
                parts += [_name(row.name),
                          _INTERFACE.pack(row.ifindex, row.linktype, row.packets, row.drops)]
        elif version != 1:
            raise ValueError(f"cannot encode chunk version {version}; this codec writes "
                             f"{list(VERSIONS)}")
        parts.append(struct.pack("<I", len(chunk.batches)))
        for batch in chunk.batches:
            data = batch.compact()
            parts += [_name(batch.interface),
                      _BATCH.pack(batch.ifindex, batch.linktype, batch.count, len(data)), data]
        if self.compress and not self.paused:
            body = b"".join(parts)
            packed = self._compressor.compress(body)
            if len(packed) <= self.worth * len(body):
                self._backoff = self.min_backoff
                self.compressed += 1
                return _OUTER.pack(MAGIC, version, CODEC_ZSTD, 0, len(packed)) + packed
            self.attempts_wasted += 1
            self._paused_until = self._clock() + self._backoff
            self._backoff = min(2 * self._backoff, self.max_backoff)
        self.uncompressed += 1
        # One copy: the outer header goes into the same join as the records.
        size = sum(len(part) for part in parts)
        return b"".join([_OUTER.pack(MAGIC, version, CODEC_NONE, 0, size), *parts])

    def decode(self, payload: bytes, max_size: int = MAX_CHUNK_BYTES) -> Chunk:
        """The chunk in ``payload``, every count, length and offset checked against the data
        (:func:`check_records`); raises :class:`ChunkError` (a ValueError) otherwise.

        ``max_size`` bounds the decompressed body: decompression is streamed and stops there,
        whatever size the frame declares, and nothing is allocated before it is read. So
        decoding holds at most ``max_size`` bytes of batch data plus a bounded overhead.
        """
        try:
            head, batches = self._decode(payload, max_size, records=True)
        except (struct.error, zstandard.ZstdError, UnicodeDecodeError, IndexError) as exc:
            raise ChunkError(f"malformed chunk: {exc}") from exc
        return Chunk(head.sensor, head.sequence, batches, head.created_ns, head.instance,
                     head.interfaces)

    def read_head(self, payload: bytes, max_size: int = MAX_CHUNK_BYTES) -> ChunkHead:
        """What a chunk says about itself (sensor, sequence, instance, interface table) and
        its batches' packet counts, without the records: for a receiver that passes the body
        on as it is (cluster mode's replica) and leaves the records to whoever decodes it
        (:meth:`decode`, which checks them). Every count and length is bounded as in
        :meth:`decode`; the batch data is decompressed and skipped, never walked, so the cost
        is per chunk and per batch, not per packet. Raises :class:`ChunkError`."""
        try:
            return self._decode(payload, max_size, records=False)[0]
        except (struct.error, zstandard.ZstdError, UnicodeDecodeError, IndexError) as exc:
            raise ChunkError(f"malformed chunk: {exc}") from exc

    def _decode(self, payload: bytes, max_size: int,
                records: bool) -> tuple[ChunkHead, tuple[PacketBatch, ...]]:
        """The head, and the batches with their records checked (none unless ``records``)."""
        magic, version, codec, _, length = _OUTER.unpack_from(payload, 0)
        if magic != MAGIC:
            raise ChunkError("malformed chunk: bad magic")
        if version not in VERSIONS:
            raise ChunkError(f"unsupported chunk version {version}")
        if len(payload) - _OUTER.size != length:
            raise ChunkError(f"malformed chunk: body is {len(payload) - _OUTER.size} bytes, "
                             f"header says {length}")
        packed = memoryview(payload)[_OUTER.size:]
        if codec == CODEC_ZSTD:
            declared = zstandard.get_frame_parameters(packed).content_size
            if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > max_size:
                raise ChunkOverLimit(f"malformed chunk: the zstd frame declares {declared} "
                                     f"bytes, over the limit of {max_size}")
            # One decompressor per chunk: they are not thread-safe, and chunks decode in threads.
            decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
            source: _Reader = decompressor.stream_reader(packed, read_across_frames=True)
        elif codec == CODEC_NONE:
            source = _ViewReader(packed)
        else:
            raise ChunkError(f"unknown chunk codec {codec}")
        body = _Body(source, max_size)
        sequence, created_ns = _HEAD.unpack(body.take(_HEAD.size, "header"))
        sensor = body.name("sensor name")
        instance, interfaces = "", []
        if version == 2:
            instance = body.name("instance id")
            rows = body.u32("interface count")
            if rows > MAX_CHUNK_INTERFACES:
                raise ChunkError(f"malformed chunk: {rows} interfaces, over the limit of "
                                 f"{MAX_CHUNK_INTERFACES}")
            for _ in range(rows):
                name = body.name("interface name")
                ifindex, linktype, packets, drops = _INTERFACE.unpack(
                    body.take(_INTERFACE.size, "interface row"))
                interfaces.append(InterfaceCounters(name, ifindex, linktype, packets, drops))
        count = body.u32("batch count")
        if count > MAX_CHUNK_BATCHES:
            raise ChunkError(f"malformed chunk: {count} batches, over the limit of "
                             f"{MAX_CHUNK_BATCHES}")
        batches = []
        packets_in_batches = 0
        linktypes: set[int] = set()
        for index in range(count):
            interface = body.name("interface name")
            ifindex, linktype, packets, size = _BATCH.unpack(body.take(_BATCH.size, "batch"))
            linktypes.add(linktype)
            if len(linktypes) > MAX_CHUNK_LINKTYPES:
                raise ChunkError(f"malformed chunk: more than {MAX_CHUNK_LINKTYPES} link types")
            if packets > size // TPACKET3_HDR.size:
                raise ChunkError(f"malformed chunk: batch {index} claims {packets} packets in "
                                 f"{size} bytes of records")
            packets_in_batches += packets
            if not records:
                body.skip(size, f"batch {index}")
                continue
            data = body.take(size, f"batch {index}")
            try:
                check_records(data, packets)
            except ChunkError as exc:
                raise ChunkError(f"malformed chunk: batch {index} ({interface[:64]!r}): "
                                 f"{exc}") from None
            batches.append(PacketBatch(interface, ifindex, linktype, data, packets))
        body.end()
        return (ChunkHead(sensor, sequence, created_ns, instance, tuple(interfaces), count,
                          packets_in_batches), tuple(batches))


@dataclass(frozen=True)
class ChunkHead:
    """A chunk without its records (:meth:`ChunkCodec.read_head`): what identifies it and
    how many packets its batches declare (not checked against the records)."""

    sensor: str
    sequence: int
    created_ns: int
    instance: str
    interfaces: tuple[InterfaceCounters, ...]
    batches: int
    packets: int


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


class ChunkError(ValueError):
    """A chunk that fails a check: the vSensor answers 400 ``bad_chunk`` and stores nothing."""


class ChunkOverLimit(ChunkError):
    """The chunk's body (decompressed) goes past the ``max_size`` it was decoded with, or its
    fields past the body's end: a caller that tried a small limit first may try the real one."""


_HDR_SIZE = TPACKET3_HDR.size
_NS = 1_000_000_000


class _ViewReader:
    """``read`` over a memoryview: each read copies only what it returns (io.BytesIO would
    copy the whole body first)."""

    __slots__ = ("view", "position")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def read(self, size: int) -> bytes:
        start = self.position
        self.position = min(start + size, len(self.view))
        return bytes(self.view[start:self.position])


class _Body:
    """The decoded body, read field by field against a budget: no length is trusted before
    it fits what is left of ``limit``."""

    __slots__ = ("source", "limit", "left")

    def __init__(self, source: _Reader, limit: int) -> None:
        self.source = source
        self.limit = limit
        self.left = limit

    def take(self, size: int, what: str) -> bytes:
        if size > self.left:
            raise ChunkOverLimit(f"malformed chunk: {what} ({size} bytes) takes the body "
                                 f"past {self.limit} bytes (or past its end)")
        data = self.source.read(size)
        if len(data) < size:  # a stream may return less at a frame boundary
            parts = [data]
            got = len(data)
            while got < size:
                more = self.source.read(size - got)
                if not more:
                    raise ChunkError(f"malformed chunk: truncated {what}")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.left -= size
        return data

    def skip(self, size: int, what: str) -> None:
        """Like :meth:`take` without keeping the bytes: read (decompress) in pieces of at
        most 1 MiB, so skipping holds no more than that."""
        if size > self.left:
            raise ChunkOverLimit(f"malformed chunk: {what} ({size} bytes) takes the body "
                                 f"past {self.limit} bytes (or past its end)")
        got = 0
        while got < size:
            more = len(self.source.read(min(size - got, 1 << 20)))
            if not more:
                raise ChunkError(f"malformed chunk: truncated {what}")
            got += more
        self.left -= size

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def name(self, what: str) -> str:
        size = int.from_bytes(self.take(2, what), "little")
        return self.take(size, what).decode()

    def end(self) -> None:
        if self.source.read(1):
            raise ChunkError("malformed chunk: data after the last batch")


def check_records(data: bytes, count: int) -> None:
    """Check that ``data`` holds exactly ``count`` TPACKET_V3 records, chained by their
    next-record offsets (the last one 0 or ending the data), each frame inside its record,
    captured length <= min(wire length, SNAPLEN), wire length <= MAX_WIRE_LENGTH, nanoseconds
    below a second. Raises ChunkError naming the first record that fails.

    This is what makes the pcapng writer's walk safe: it trusts these fields.
    """
    size = len(data)
    if not count:
        if size:
            raise ChunkError(f"{size} bytes of records for 0 packets")
        return
    unpack = TPACKET3_HDR.unpack_from
    last = count - 1
    offset = 0
    for index in range(count):
        if offset + _HDR_SIZE > size:
            raise ChunkError(f"record {index} at {offset} is past the data ({size} bytes)")
        step, _, nsec, snaplen, length, _, mac, _, _, _, _, _ = unpack(data, offset)
        if index == last:
            end = size if step == 0 else offset + step
            if end != size:
                raise ChunkError(f"the last record ({index}) ends at {end}, the data at {size}")
        else:
            end = offset + step
            if step < _HDR_SIZE or end >= size:
                raise ChunkError(f"record {index} at {offset}: next offset {step} is not "
                                 f"inside the data ({size} bytes)")
        if mac < _HDR_SIZE or offset + mac + snaplen > end:
            raise ChunkError(f"record {index} at {offset}: frame at +{mac}, {snaplen} bytes, "
                             f"is not inside its record ({end - offset} bytes)")
        if snaplen > length or snaplen > SNAPLEN:
            raise ChunkError(f"record {index}: captured length {snaplen} is over the wire "
                             f"length {length} or the snap length {SNAPLEN}")
        if length > MAX_WIRE_LENGTH or nsec >= _NS:
            raise ChunkError(f"record {index}: wire length {length} or nanoseconds {nsec} out "
                             f"of range")
        offset = end
