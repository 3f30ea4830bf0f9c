"""The batch record layout, slicing, the chunk wire format and pcapng writing."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest

from ossensor_core.capture.batch import (TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID, TPACKET3_HDR,
                                 PacketBatch)
from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.wire.pcapng import PcapngWriter
from ossensor_core.pipeline.contracts import Chunk

FRAMES = [(1_700_000_000_123_456_789 + i, 60 + i, bytes([i % 256]) * (60 + i)) for i in range(50)]


def batch() -> PacketBatch:
    return PacketBatch.from_frames("eth0", 2, 1, FRAMES)


def test_from_frames_round_trip():
    packets = list(batch().packets())
    assert [(p.timestamp_ns, p.wire_length, p.data) for p in packets] == FRAMES
    assert batch().byte_count() == sum(f[1] for f in FRAMES)


def test_slicing_shares_data_and_compacts():
    whole = batch()
    part = whole[10:20]
    assert part.data is whole.data and len(part) == 10
    assert [p.data for p in part.packets()] == [f[2] for f in FRAMES[10:20]]
    picked = whole.select([3, 1, 49])
    assert [p.timestamp_ns for p in picked.packets()] == [FRAMES[i][0] for i in (3, 1, 49)]
    rebuilt = PacketBatch("eth0", 2, 1, picked.compact(), 3)
    assert [p.data for p in rebuilt.packets()] == [FRAMES[i][2] for i in (3, 1, 49)]


def kernel_like_batch_with_vlan() -> PacketBatch:
    """Two records as the kernel writes them: VLAN stripped into the header, last offset 0."""
    frame = bytes(range(12)) + b"\x08\x00" + b"payload!"
    records = b""
    for index, (status, tpid) in enumerate(((TP_STATUS_VLAN_VALID, 0),
                                            (TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID,
                                             0x88A8))):
        size = 0 if index == 1 else 96
        header = TPACKET3_HDR.pack(size, 10, 5, len(frame), len(frame), status, 66, 80, 0, 100,
                                   tpid, 0)
        record = header + b"\0" * (66 - len(header)) + frame
        records += record + b"\0" * ((96 - len(record)) if size else 0)
    return PacketBatch("eth0", 2, 1, records, 2)


def test_vlan_tag_put_back_like_libpcap():
    first, second = list(kernel_like_batch_with_vlan().packets())
    assert first.data[12:16] == struct.pack("!HH", 0x8100, 100)
    assert second.data[12:16] == struct.pack("!HH", 0x88A8, 100)
    assert first.data[16:18] == b"\x08\x00" and first.wire_length == len(first.data)


def test_compact_handles_the_last_kernel_record():
    whole = kernel_like_batch_with_vlan()
    only_last = whole.select([1])
    rebuilt = PacketBatch("eth0", 2, 1, only_last.compact(), 1)
    assert list(rebuilt.packets()) == list(only_last.packets())


def test_chunk_round_trip_compressed_and_plain():
    chunk = Chunk("node-1", 7, (batch(), kernel_like_batch_with_vlan()[1:]), 123)
    for codec in (ChunkCodec(), ChunkCodec(compress=False)):
        decoded = codec.decode(codec.encode(chunk))
        assert (decoded.sensor, decoded.sequence, decoded.created_ns) == ("node-1", 7, 123)
        assert [list(b.packets()) for b in decoded.batches] == \
            [list(b.packets()) for b in chunk.batches]


@pytest.mark.parametrize("damage", [lambda b: b"XXXX" + b[4:], lambda b: b[:-3],
                                    lambda b: b[:5] + b"\x09" + b[6:]])
def test_malformed_chunks_are_refused(damage):
    payload = ChunkCodec().encode(Chunk("n", 1, (batch(),), 1))
    with pytest.raises(ValueError):
        ChunkCodec().decode(damage(payload))


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_pcapng_read_by_tshark(tmp_path):
    path = tmp_path / "x.pcapng"
    out = io.BytesIO()
    writer = PcapngWriter(out, 1)
    writer.write_batch(batch())
    writer.write_batch(PacketBatch.from_frames("eth1", 3, 1, FRAMES[:3]))
    path.write_bytes(out.getvalue())
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len",
                           "-e", "frame.interface_name", "-e", "frame.time_epoch"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == 53
    assert rows[0][:2] == ["60", "eth0"] and rows[-1][1] == "eth1"
    assert rows[0][2].startswith("1700000000.123456789")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def random_chunk(sequence: int, packets: int = 200) -> Chunk:
    import os
    frames = [(i, 512, os.urandom(512)) for i in range(packets)]
    return Chunk("node", sequence, (PacketBatch.from_frames("eth0", 2, 1, frames),), 0)


def codec_of(encoded: bytes) -> int:
    return encoded[5]


def test_compression_pauses_on_random_payloads_and_tries_again():
    clock = FakeClock()
    codec = ChunkCodec(backoff=1.0, max_backoff=4.0, clock=clock)
    # The first chunk is tried, found incompressible, and sent as it is.
    first = codec.encode(random_chunk(1))
    assert codec_of(first) == 0 and codec.attempts_wasted == 1
    # While paused no compression is attempted at all.
    for sequence in range(2, 12):
        assert codec_of(codec.encode(random_chunk(sequence))) == 0
    assert codec.attempts_wasted == 1 and codec.paused
    # After the pause it tries again (still random: paused again, for twice as long).
    clock.now += 1.01
    codec.encode(random_chunk(20))
    assert codec.attempts_wasted == 2 and codec.paused
    clock.now += 1.5
    assert codec.paused  # the pause doubled to 2 s
    clock.now += 0.6
    assert not codec.paused
    # Compressible traffic again: the next try compresses, and compression stays on.
    compressible = Chunk("node", 30, (batch(),), 0)
    assert codec_of(codec.encode(compressible)) == 1
    assert not codec.paused
    assert codec_of(codec.encode(Chunk("node", 31, (batch(),), 0))) == 1
    assert (codec.compressed, codec.attempts_wasted) == (2, 2)


def test_uncompressed_and_compressed_chunks_decode_to_the_same_records():
    clock = FakeClock()
    codec = ChunkCodec(clock=clock)
    chunk = random_chunk(7)
    raw = codec.encode(chunk)  # incompressible: sent as it is
    assert codec_of(raw) == 0
    decoded = codec.decode(raw)
    assert decoded.sequence == 7 and decoded.batches[0].data == chunk.batches[0].data
    packed = ChunkCodec().encode(Chunk("node", 8, (batch(),), 0))
    assert codec_of(packed) == 1
    assert [p.data for p in codec.decode(packed).batches[0].packets()] == [f[2] for f in FRAMES]


def chunk_v2() -> Chunk:
    from ossensor_core.pipeline.contracts import InterfaceCounters
    table = (InterfaceCounters("eth0", 2, 1, 5_000_000_000, 7),
             InterfaceCounters("wg0", 9, 101, 0, 0))  # captured, no batch in this chunk
    return Chunk("node-1", 8, (batch(),), 123, "3f2a" * 8, table)


def test_chunk_v2_round_trip_carries_instance_and_interface_table():
    chunk = chunk_v2()
    for codec in (ChunkCodec(), ChunkCodec(compress=False)):
        payload = codec.encode(chunk, version=2)
        assert payload[4] == 2
        decoded = codec.decode(payload)
        assert (decoded.sensor, decoded.sequence, decoded.created_ns) == ("node-1", 8, 123)
        assert decoded.instance == chunk.instance
        assert decoded.interfaces == chunk.interfaces  # u64 counters: 5e9 survives
        assert [list(b.packets()) for b in decoded.batches] == \
            [list(b.packets()) for b in chunk.batches]


def test_chunk_v1_is_the_default_and_leaves_the_v2_fields_out():
    chunk = chunk_v2()
    payload = ChunkCodec().encode(chunk)
    assert payload[4] == 1 and payload == ChunkCodec().encode(chunk, version=1)
    decoded = ChunkCodec().decode(payload)
    assert (decoded.instance, decoded.interfaces) == ("", ())
    assert decoded.packets == chunk.packets
    with pytest.raises(ValueError, match="cannot encode chunk version 3"):
        ChunkCodec().encode(chunk, version=3)


def test_chunk_version_byte_decides_the_layout():
    payload = ChunkCodec(compress=False).encode(chunk_v2(), version=2)
    for version in (1, 3):  # a v2 body read as v1 is garbage; v3 is unknown
        with pytest.raises(ValueError):
            ChunkCodec().decode(payload[:4] + bytes([version]) + payload[5:])


def test_the_sensor_puts_every_capture_and_its_kernel_counters_in_the_chunk():
    """``Sensor._cut`` (the real method, on a sensor holding only captures): the table lists
    every capture, also one without a batch in the chunk, with its counters when cut."""
    import asyncio
    from types import SimpleNamespace

    from ossensor_core.pipeline.chunker import Chunker
    from ossensor_core.pipeline.contracts import InterfaceCounters
    from ossensor_core.pipeline.sensor import Sensor, _Capture
    from ossensor_core.testing import FakeCaptureSource, fake_interface

    busy = FakeCaptureSource([bytes(60)] * 5, fake_interface("eth0", 2))
    idle = FakeCaptureSource([], fake_interface("wg0", 9), linktype=101)

    async def cut() -> Chunk:
        sensor = Sensor.__new__(Sensor)
        sensor.config = SimpleNamespace(name="node-1")
        sensor.captures = {2: _Capture(busy, None), 9: _Capture(idle, None)}
        sensor.closed_stats, sensor.queue = {}, asyncio.Queue()
        sensor.chunker = Chunker("node-1", [], 4 << 20, 1.0, sensor.interface_table, 41)
        sensor.chunker.pending = busy.read()
        sensor.chunker.pending_bytes = sum(len(b.data) for b in sensor.chunker.pending)
        await sensor._cut()
        return sensor.queue.get_nowait()

    try:
        chunk = asyncio.run(cut())
    finally:
        busy.close()
        idle.close()
    assert (chunk.sensor, chunk.sequence, chunk.packets) == ("node-1", 42, 5)
    assert chunk.interfaces == (InterfaceCounters("eth0", 2, 1, 5, 0),
                                InterfaceCounters("wg0", 9, 101, 0, 0))
    assert chunk.instance == ""  # the transport's to stamp
    assert ChunkCodec().decode(ChunkCodec().encode(chunk, version=2)).interfaces == \
        chunk.interfaces


def test_the_encoder_stays_inside_the_decoders_bounds_at_every_level():
    """zstd levels over 19 (20: 32 MiB) would need windows past MAX_ZSTD_WINDOW, which a vSensor does not
    allocate: the codec caps them, so its chunks always decode."""
    import zstandard
    from ossensor_core.wire.names import MAX_ZSTD_WINDOW
    frame = bytes(range(256)) * 5
    batch = PacketBatch.from_frames("eth0", 2, 1, [(i, len(frame) + 4, frame + i.to_bytes(4, "big"))
                                                   for i in range(7000)])  # 9.5 MiB of records
    chunk = Chunk("node-1", 1, (batch,), 0)
    for level in (-3, 20):
        payload = ChunkCodec(level=level).encode(chunk)
        assert payload[5] == 1  # compressed
        window = zstandard.get_frame_parameters(payload[12:]).window_size
        assert window <= MAX_ZSTD_WINDOW, (level, window)
        assert ChunkCodec().decode(payload).packets == 7000


def test_vlan_frames_at_the_snap_length_stay_within_it_in_pcapng():
    """A restored 802.1Q tag never takes a frame past SNAPLEN (tshark refuses longer ones)."""
    from ossensor_core.wire.names import SNAPLEN
    frame = bytes(SNAPLEN)
    batch = PacketBatch.from_frames("eth0", 2, 1, [(0, 70000 * 4, frame)])
    data = bytearray(batch.data)
    struct.pack_into("<I", data, 20, TP_STATUS_VLAN_VALID)  # tp_status
    batch = PacketBatch("eth0", 2, 1, bytes(data), 1)
    out = io.BytesIO()
    PcapngWriter(out, 1).write_batch(batch)
    (packet,) = [p for p in _epb_lengths(out.getvalue())]
    assert packet == (SNAPLEN, 70000 * 4 + 4)


def _epb_lengths(data: bytes):
    position = 0
    while position < len(data):
        kind, length = struct.unpack_from("<II", data, position)
        if kind == 6:
            yield struct.unpack_from("<II", data, position + 20)
        position += length
