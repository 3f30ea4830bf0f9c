"""Cluster mode's chunk ingest: a real vSensor replica over TLS publishing into a real
three-server JetStream cluster (tests/helpers/nats.py), read back with a client of its own."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from hypothesis import given, strategies as st
from ossensor_vsensor.cluster import (H_MSG_ID, H_PART, H_SENSOR, H_SEQUENCE, STREAM,
                                      SUBJECT_PREFIX, partition)
from ossensor_vsensor.cluster.connection import ClusterSettings
from ossensor_vsensor.cluster.ingest import HEADER_ROOM, JetStreamSink
from ossensor_vsensor.chunks import INLINE_DECODED_BYTES, INLINE_HEAD_BYTES
from ossensor_vsensor.cluster.names import token
from ossensor_vsensor.sinks import LocalSink

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk, ChunkCodec
from ossensor_core.wire.names import CHUNK_MEDIA_TYPE
from ossensor_core.wire.signing import PATH_CHUNKS
from tests.helpers.nats import SERVER_SETTINGS, nats_cluster, needs_nats
from tests.helpers.vsensor import SENSOR, make_chunk, running, settings
from tests.vsensor.test_fuzz import FUZZ, SMALL_LIMIT, _wrap, chunks, mutated

def run(coro):
    return asyncio.run(coro)


def replica_settings(tmp_path, urls: str, **cluster):
    values = dict(replicas=3, name="replica-a", publish_timeout=3.0)
    values.update(cluster)
    return settings(tmp_path, cluster=ClusterSettings(tuple(urls.split(",")), **values))


def noisy_chunk(sequence: int, packets: int, sensor: str = SENSOR) -> Chunk:
    """A chunk of random 1400-byte frames: incompressible, so its body is about
    1.4 kB per packet."""
    start = 1_764_262_800_000_000_000
    frames = [(start + i, 1414, b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + os.urandom(1400))
              for i in range(packets)]
    return Chunk(sensor, sequence, (PacketBatch.from_frames("eth0", 2, 1, frames),), start)


async def post_body(client, body: bytes, sequence: int, sensor: str = SENSOR,
                    headers: dict[str, str] | None = None):
    """POST an encoded chunk as it is (so the test knows the exact bytes sent)."""
    return await client.post(PATH_CHUNKS, body, sensor=sensor,
                             headers={"Content-Type": CHUNK_MEDIA_TYPE,
                                      "X-Ossensor-Chunk-Sequence": str(sequence),
                                      **(headers or {})})


async def stream_messages(urls: str) -> list:
    """Every message in the chunk stream (nothing consumes it in these tests), in order."""
    import nats
    nc = await nats.connect(servers=urls.split(","), connect_timeout=5)
    try:
        js = nc.jetstream(timeout=10)
        state = (await js.stream_info(STREAM)).state
        return [await js.get_msg(STREAM, seq) for seq in
                range(state.first_seq, state.last_seq + 1)] if state.messages else []
    finally:
        await nc.close()


@needs_nats
def test_a_chunk_is_published_as_sent_and_its_retry_is_a_duplicate(tmp_path, tls):
    codec = ChunkCodec()
    body = codec.encode(make_chunk(7, packets=3, raw_packets=2))
    dense = b""

    async def scenario(urls):
        nonlocal dense
        async with running(replica_settings(tmp_path, urls), tls) as client:
            vsensor = client.vsensor
            assert isinstance(vsensor.sink, JetStreamSink) and vsensor.stores is None
            assert (await client.register())[0] == 200
            status, answer, _ = await post_body(client, body, 7)
            assert (status, answer) == (200, {"stored": 5})
            status, answer, _ = await post_body(client, body, 7)
            assert (status, answer) == (200, {"duplicate": True})
            state = vsensor.sensors[SENSOR]
            assert (state.chunks, state.duplicates, state.packets) == (1, 1, 5)

            # The head is still checked against the signed request: nothing is published.
            status, answer, _ = await post_body(client, body, 8)
            assert status == 400 and answer["error"] == "bad_chunk", answer
            assert "differs from the chunk's sequence 7" in answer["detail"]
            other = codec.encode(make_chunk(9, sensor="node-2"))
            status, answer, _ = await post_body(client, other, 9)
            assert status == 400 and "belongs to sensor 'node-2'" in answer["detail"]
            # A small body that decompresses past what is read on the event loop: its head is
            # read in a thread instead, and it is taken like any other.
            start = 1_764_262_800_000_000_000
            same = PacketBatch.from_frames("eth0", 2, 1, [(start, 60, b"\x02" * 60)] * 40000)
            dense = codec.encode(Chunk(SENSOR, 11, (same,), start))
            assert len(dense) < INLINE_HEAD_BYTES and len(same.data) > INLINE_DECODED_BYTES
            assert (await post_body(client, dense, 11))[:2] == (200, {"stored": 40000})
            # A test chunk is decoded whole and not published either.
            status, answer, _ = await post_body(client, codec.encode(make_chunk(10)), 10,
                                                headers={"X-Ossensor-Test": "1"})
            assert (status, answer) == (200, {"test": True, "packets": 3})

        message, other = await stream_messages(urls)
        assert other.data == dense and other.headers[H_SEQUENCE] == "11"
        assert message.subject == f"{SUBJECT_PREFIX}.{partition(SENSOR)}.{token(SENSOR)}"
        assert message.data == body
        assert message.headers[H_SENSOR] == SENSOR
        assert message.headers[H_SEQUENCE] == "7"
        assert message.headers[H_MSG_ID] == f"{token(SENSOR)}.7"
        assert H_PART not in message.headers

    with nats_cluster(tmp_path / "nats", 3) as cluster:
        run(scenario(cluster.urls))
    # Nothing of the chunk in the replica's data folder.
    assert not (tmp_path / "data" / SENSOR).exists()


@needs_nats
def test_a_chunk_over_max_payload_goes_in_parts_that_add_up_to_the_body(tmp_path, tls):
    chunk = noisy_chunk(3, packets=2500)  # about 3.5 MB: 4 parts of 1 MiB
    body = ChunkCodec().encode(chunk)
    part = SERVER_SETTINGS["max_payload"] - HEADER_ROOM
    count = -(-len(body) // part)
    assert count >= 3

    async def scenario(urls):
        async with running(replica_settings(tmp_path, urls), tls) as client:
            assert (await client.register())[0] == 200
            status, answer, _ = await post_body(client, body, 3)
            assert (status, answer) == (200, {"stored": 2500})
            assert client.vsensor.sink.parts_published == count
            status, answer, _ = await post_body(client, body, 3)
            assert (status, answer) == (200, {"duplicate": True})
        messages = await stream_messages(urls)
        assert len(messages) == count
        assert [m.headers[H_PART] for m in messages] == [f"{i}/{count}"
                                                        for i in range(1, count + 1)]
        assert [m.headers[H_MSG_ID] for m in messages] == [f"{token(SENSOR)}.3.{i}"
                                                          for i in range(1, count + 1)]
        assert all(m.headers[H_SEQUENCE] == "3" for m in messages)
        assert all(len(m.data) + HEADER_ROOM <= SERVER_SETTINGS["max_payload"]
                   for m in messages)
        assert b"".join(m.data for m in messages) == body

    with nats_cluster(tmp_path / "nats", 3) as cluster:
        run(scenario(cluster.urls))


@needs_nats
def test_without_a_quorum_the_replica_answers_503_and_the_retry_is_stored(tmp_path, tls):
    body = ChunkCodec().encode(make_chunk(1, packets=4))
    later = ChunkCodec().encode(make_chunk(2, packets=2))

    async def scenario(cluster):
        async with running(replica_settings(tmp_path, cluster.urls, publish_timeout=2.0),
                           tls) as client:
            assert (await client.register())[0] == 200
            assert (await post_body(client, body, 1))[:2] == (200, {"stored": 4})
            cluster.kill(1)
            cluster.kill(2)
            status, answer, headers = await post_body(client, later, 2)
            assert status == 503, answer
            assert headers["Retry-After"] == "5"
            # Refused by the cluster-wide replay check (before the sink) or by the sink.
            assert answer["error"] == "busy" or "cluster cannot store" in answer["error"]
            assert client.vsensor.metrics.auth_failures["busy"] \
                + client.vsensor.metrics.chunks["unavailable"] == 1

            cluster.start(1)
            cluster.start(2)
            await asyncio.to_thread(cluster.wait_ready)
            # The sensor kept its chunk and sends it again until it is taken.
            deadline = time.monotonic() + 90
            while True:
                status, answer, headers = await post_body(client, later, 2)
                if status == 200 or time.monotonic() > deadline:
                    break
                assert status == 503 and headers["Retry-After"], answer
                await asyncio.sleep(1)
            # Stored, or a duplicate: a publish that timed out may have gone through after
            # the client reconnected. Either way it is in the stream, once.
            assert status == 200 and answer in ({"stored": 2}, {"duplicate": True}), answer
        messages = await stream_messages(cluster.urls)
        assert [m.headers[H_MSG_ID] for m in messages] == [f"{token(SENSOR)}.1",
                                                           f"{token(SENSOR)}.2"]
        assert [m.data for m in messages] == [body, later]

    with nats_cluster(tmp_path / "nats", 3) as cluster:
        run(scenario(cluster))


@needs_nats
def test_a_full_stream_answers_507_and_keeps_what_it_stored(tmp_path, tls):
    codec = ChunkCodec()
    bodies = [codec.encode(noisy_chunk(i, packets=200)) for i in range(1, 12)]  # ~280 kB each

    async def scenario(urls):
        async with running(replica_settings(tmp_path, urls, stream_max_bytes=1 << 20),
                           tls) as client:
            assert (await client.register())[0] == 200
            stored = 0
            for sequence, body in enumerate(bodies, 1):
                status, answer, headers = await post_body(client, body, sequence)
                if status != 200:
                    break
                assert answer == {"stored": 200}
                stored += 1
            assert 2 <= stored < len(bodies)
            assert status == 507, answer
            assert headers["Retry-After"] == "5"
            assert answer == {"error": "the vSensor's chunk stream is full"}
            assert client.vsensor.metrics.chunks["failed"] == 1
            # Still full: the same answer for the retry, and nothing stored is dropped.
            assert (await post_body(client, bodies[stored], stored + 1))[0] == 507
        messages = await stream_messages(urls)
        assert [m.data for m in messages] == bodies[:stored]

    with nats_cluster(tmp_path / "nats", 3) as cluster:
        run(scenario(cluster.urls))


@needs_nats
def test_a_server_whose_max_payload_is_too_small_stops_the_start(tmp_path, tls, monkeypatch):
    monkeypatch.setitem(SERVER_SETTINGS, "max_payload", 32 * 1024)

    async def scenario(urls):
        with pytest.raises(RuntimeError, match=r"max_payload \(32768 bytes\) is too small"):
            async with running(replica_settings(tmp_path, urls, replicas=1), tls):
                pass

    with nats_cluster(tmp_path / "nats", 1) as cluster:
        run(scenario(cluster.urls))


@needs_nats
def test_an_answer_that_is_not_jetstreams_is_no_acknowledgement(tmp_path, tls):
    """A client that may subscribe to the chunk subjects can answer a publish itself: with the
    stream gone, only it answers, and the replica does not take that for "stored"."""
    import nats

    async def scenario(urls):
        async with running(replica_settings(tmp_path, urls, replicas=1), tls) as client:
            assert (await client.register())[0] == 200
            impostor = await nats.connect(servers=[urls])
            answers = iter([b"not json", b'{"seq": 3}', b'{"stream": "OTHER", "seq": 3}',
                            b'{"stream": "OSSENSOR_CHUNKS", "seq": -1}'])

            async def answer(msg):
                await msg.respond(next(answers))

            try:
                await impostor.jetstream().delete_stream(STREAM)
                await impostor.subscribe(f"{SUBJECT_PREFIX}.>", cb=answer)
                await impostor.flush()
                for sequence in range(1, 5):
                    status, answer_body, headers = await client.send_chunk(make_chunk(sequence))
                    assert status == 503 and headers["Retry-After"] == "5", answer_body
            finally:
                await impostor.close()
            assert client.vsensor.sink.parts_published == 0

    with nats_cluster(tmp_path / "nats", 1) as cluster:
        run(scenario(cluster.urls))


def test_single_mode_still_stores_through_the_local_sink(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert isinstance(client.vsensor.sink, LocalSink)
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(1)))[:2] == (200, {"stored": 3})
    run(scenario())
    assert any((tmp_path / "data" / SENSOR).iterdir())


def test_the_head_says_what_decoding_says_without_the_records():
    from ossensor_core.wire.chunk import ChunkError, ChunkOverLimit, InterfaceCounters
    codec = ChunkCodec()
    chunk = make_chunk(41, packets=5, raw_packets=3)
    chunk = Chunk(chunk.sensor, chunk.sequence, chunk.batches, chunk.created_ns, "inst-1",
                  (InterfaceCounters("eth0", 2, 1, 900, 4),))
    for compress in (True, False):
        codec.compress = compress
        for version in (1, 2):
            body = codec.encode(chunk, version)
            whole, head = codec.decode(body), codec.read_head(body)
            assert (head.sensor, head.sequence, head.created_ns, head.instance,
                    head.interfaces, head.packets, head.batches) == \
                (whole.sensor, whole.sequence, whole.created_ns, whole.instance,
                 whole.interfaces, whole.packets, len(whole.batches))
            with pytest.raises(ChunkError, match="body is"):
                codec.read_head(body[:-1])
            # A limit too small for the body is told apart (the receiver then uses the real
            # one, in a thread).
            with pytest.raises(ChunkOverLimit):
                codec.read_head(body, 64)
    with pytest.raises(ChunkError, match="bad magic"):
        codec.read_head(b"XXXX" + body[4:])


def _head_agrees_with_decode(payload: bytes, limit: int) -> None:
    """read_head never accepts less than decode: whatever decode takes, read_head takes with
    the same head; what read_head refuses is a ValueError (ChunkError), never anything else."""
    from ossensor_core.wire.chunk import ChunkHead
    codec = ChunkCodec()
    try:
        head = codec.read_head(payload, limit)
    except ValueError:
        head = None
    try:
        whole = codec.decode(payload, limit)
    except ValueError:
        return
    assert isinstance(head, ChunkHead)
    assert (head.sensor, head.sequence, head.created_ns, head.instance, head.interfaces,
            head.packets, head.batches) == (whole.sensor, whole.sequence, whole.created_ns,
                                            whole.instance, whole.interfaces, whole.packets,
                                            len(whole.batches))


@FUZZ
@given(st.data(), chunks(), st.booleans(), st.booleans(), st.sampled_from((1, 2)),
       st.sampled_from((SMALL_LIMIT, 1 << 20)))
def test_mutated_chunks_have_the_head_that_decoding_finds(data, chunk, compress, rewrap,
                                                          version, limit):
    encoded = ChunkCodec(compress=compress).encode(chunk, version=version)
    if rewrap:  # mutate the body, keep the outer header right: exercises the inner parser
        payload = _wrap(data.draw(mutated(encoded[12:])), encoded[5], version)
    else:
        payload = data.draw(mutated(encoded))
    _head_agrees_with_decode(encoded, 1 << 20)
    _head_agrees_with_decode(payload, limit)
