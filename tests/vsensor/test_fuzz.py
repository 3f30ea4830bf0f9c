"""Property-based tests: the chunk decoder and the chunk endpoint take any bytes calmly.

Whatever arrives, ``ChunkCodec().decode`` returns a Chunk or raises ValueError (the vSensor's
400), never another exception (a 500, and on the sensor a retry loop); the endpoint answers
400 to garbage and truncated chunks and writes nothing.
"""

from __future__ import annotations

import asyncio
import struct

from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import CODEC_NONE, MAGIC, VERSION, VERSIONS, ChunkCodec
from ossensor_core.wire.signing import PATH_CHUNKS
from ossensor_core.pipeline.contracts import Chunk, InterfaceCounters
from tests.helpers.vsensor import SENSOR, running, settings

MAX_TIMESTAMP_NS = 2**32 * 10**9 - 1  # tpacket3_hdr keeps seconds in a u32
FUZZ = hsettings(max_examples=300, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chunks(draw) -> Chunk:
    batches = []
    for _ in range(draw(st.integers(0, 3))):
        frames = draw(st.lists(st.binary(min_size=0, max_size=80), max_size=4))
        batches.append(PacketBatch.from_frames(
            draw(st.text(max_size=12)), draw(st.integers(0, 2**32 - 1)),
            draw(st.sampled_from([1, 101, 113, 228, 229, 65535])),
            [(draw(st.integers(0, MAX_TIMESTAMP_NS)), len(f) + draw(st.integers(0, 100)), f)
             for f in frames]))
    table = tuple(InterfaceCounters(draw(st.text(max_size=12)), draw(st.integers(0, 2**32 - 1)),
                                    draw(st.integers(0, 2**16 - 1)),
                                    draw(st.integers(0, 2**64 - 1)),
                                    draw(st.integers(0, 2**64 - 1)))
                  for _ in range(draw(st.integers(0, 3))))
    return Chunk(draw(st.text(max_size=30)), draw(st.integers(0, 2**64 - 1)), tuple(batches),
                 draw(st.integers(0, 2**64 - 1)), draw(st.text(max_size=40)), table)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with bytes replaced, cut out or put in, and sometimes truncated."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["replace", "delete", "insert"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "replace" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "delete" and out:
            del out[at:at + draw(st.integers(1, 8))]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return bytes(out)


def _wrap(body: bytes, codec: int = CODEC_NONE, version: int = VERSION) -> bytes:
    """An outer header that matches ``body``: what gets a mutation past the length check."""
    return struct.pack("<4sBBHI", MAGIC, version, codec, 0, len(body)) + body


def _decodes_or_value_error(payload: bytes) -> Chunk | None:
    try:
        chunk = ChunkCodec().decode(payload)
    except ValueError:
        return None
    assert isinstance(chunk, Chunk)
    assert isinstance(chunk.sensor, str) and isinstance(chunk.sequence, int)
    for batch in chunk.batches:
        assert isinstance(batch, PacketBatch) and isinstance(batch.data, bytes)
        assert isinstance(batch.interface, str) and batch.count >= 0
    assert isinstance(chunk.instance, str)
    for row in chunk.interfaces:
        assert isinstance(row, InterfaceCounters) and isinstance(row.name, str)
        assert row.packets >= 0 and row.drops >= 0
    return chunk


@FUZZ
@given(st.one_of(st.binary(max_size=600),
                 st.binary(max_size=600).map(_wrap),
                 st.binary(max_size=600).map(lambda b: _wrap(b, version=2)),
                 st.tuples(st.integers(0, 255), st.binary(max_size=600)).map(
                     lambda t: _wrap(t[1], t[0]))))
def test_random_bytes_decode_or_raise_value_error(payload):
    _decodes_or_value_error(payload)


@FUZZ
@given(st.data(), chunks(), st.booleans(), st.booleans(), st.sampled_from(VERSIONS))
def test_mutated_chunks_decode_or_raise_value_error(data, chunk, compress, rewrap, version):
    codec = ChunkCodec(compress=compress)
    encoded = codec.encode(chunk, version=version)
    decoded = _decodes_or_value_error(encoded)  # the unmutated chunk round-trips
    assert decoded is not None
    assert (decoded.sensor, decoded.sequence, decoded.created_ns, decoded.packets) == (
        chunk.sensor, chunk.sequence, chunk.created_ns, chunk.packets)
    assert [bytes(b.data) for b in decoded.batches] == [b.compact() for b in chunk.batches]
    assert (decoded.instance, decoded.interfaces) == (
        (chunk.instance, chunk.interfaces) if version == 2 else ("", ()))
    if rewrap:  # mutate the body, keep the outer header right: exercises the inner parser
        payload = _wrap(data.draw(mutated(encoded[12:])), encoded[5], version)
    else:
        payload = data.draw(mutated(encoded))
    _decodes_or_value_error(payload)


def test_the_endpoint_answers_400_to_garbage_and_truncated_chunks(tmp_path, tls):
    from tests.helpers.vsensor import make_chunk
    data_dir = tmp_path / "data"
    loop = asyncio.new_event_loop()
    context = running(settings(tmp_path), tls)
    client = loop.run_until_complete(context.__aenter__())
    sent = []
    valid = [ChunkCodec(compress=c).encode(make_chunk(1, packets=3, raw_packets=1), version=v)
             for c in (True, False) for v in VERSIONS]
    try:
        assert loop.run_until_complete(client.register())[0] == 200

        @hsettings(max_examples=150, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
        @given(st.one_of(
            st.binary(max_size=400),
            st.binary(max_size=400).map(_wrap),
            st.tuples(st.sampled_from(valid), st.data()).map(
                lambda t: t[0][:t[1].draw(st.integers(0, len(t[0]) - 1))])))
        def check(body):
            decoded = _decodes_or_value_error(body)
            # Garbage that happens to be a chunk of this sensor with this sequence is no test.
            assume(decoded is None or (decoded.sensor, decoded.sequence) != (SENSOR, 1))
            status, answer, _ = loop.run_until_complete(client.post(
                PATH_CHUNKS, body, headers={"X-Ossensor-Chunk-Sequence": "1"}))
            assert status == 400, answer
            assert isinstance(answer, dict) and answer["error"]
            sent.append(body)

        check()
        vsensor = client.vsensor
        assert vsensor.metrics.chunks["malformed"] == len(sent) > 0
        assert vsensor.sensors[SENSOR].chunks == vsensor.sensors[SENSOR].packets == 0
        assert vsensor.metrics.chunks["stored"] == 0
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
    # Only the nonce journal (issue 15, item 6: nonces survive a restart), no packet data.
    assert not data_dir.exists() or [p for p in data_dir.rglob("*")
                                     if p.name != ".nonces"] == []
