"""Chunk format v2 at the reference vSensor (real TLS): it says it reads v2, stores v2 chunks,
shows their kernel counters between heartbeats, refuses a chunk whose instance is not the
sender's, and still stores v1 chunks from older sensors."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from ossensor_core.wire.chunk import MEDIA_TYPE, ChunkCodec
from ossensor_core.wire.signing import H_INSTANCE, PATH_CHUNKS, PATH_HEARTBEAT
from ossensor_core.wire.chunk import Chunk, InterfaceCounters
from tests.helpers.vsensor import Client, make_chunk, running, settings, stored_files

INSTANCE = "5e1f" * 8


def v2_chunk(sequence: int, packets: int, drops: int, instance: str = INSTANCE) -> Chunk:
    table = (InterfaceCounters("eth0", 2, 1, packets, drops),
             InterfaceCounters("wg0", 5, 101, 40, 1))  # captured, no batch in this chunk
    return dataclasses.replace(make_chunk(sequence), instance=instance, interfaces=table)


async def send(client: Client, chunk: Chunk, version: int,
               instance: str = INSTANCE) -> tuple[int, object]:
    body = ChunkCodec().encode(chunk, version=version)
    code, answer, _ = await client.post(PATH_CHUNKS, body, headers={
        "Content-Type": MEDIA_TYPE, "X-Ossensor-Chunk-Sequence": str(chunk.sequence),
        H_INSTANCE: instance})
    return code, answer


async def kernel(client: Client) -> tuple[int, int, dict]:
    code, text = await client.get("/status.json")
    assert code == 200, text
    (sensor,) = json.loads(text)["sensors"]
    return sensor["kernel_packets"], sensor["kernel_drops"], sensor["kernel"]


def test_v2_chunks_are_stored_and_show_kernel_counters_between_heartbeats(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            code, answer, _ = await client.register(instance=INSTANCE)
            assert code == 200 and answer["chunk_versions"] == [1, 2]

            assert await send(client, v2_chunk(1, 1000, 3), 2) == (200, {"stored": 3})
            assert await kernel(client) == (1040, 4, {"eth0": {"packets": 1000, "drops": 3},
                                                      "wg0": {"packets": 40, "drops": 1}})
            assert await send(client, v2_chunk(2, 1500, 9), 2) == (200, {"stored": 3})
            assert (await kernel(client))[:2] == (1540, 10)
            # A chunk that waited in a spool carries older counters: they never go back.
            assert await send(client, v2_chunk(0, 900, 2), 2) == (200, {"stored": 3})
            assert (await kernel(client))[:2] == (1540, 10)
            # A heartbeat is authoritative (a reopened capture starts from zero again).
            body = json.dumps({"interfaces": {"eth0": {"packets": 5, "drops": 0}}}).encode()
            code, _, _ = await client.post(PATH_HEARTBEAT, body,
                                           headers={H_INSTANCE: INSTANCE})
            assert code == 200
            assert await kernel(client) == (5, 0, {"eth0": {"packets": 5, "drops": 0}})

            # An old sensor's v1 chunk is still stored; it carries no counters.
            assert await send(client, v2_chunk(3, 10**6, 10**3), 1) == (200, {"stored": 3})
            assert (await kernel(client))[:2] == (5, 0)
            state = client.vsensor.sensors["node-1"]
            assert (state.chunks, state.packets) == (4, 12)
            await client.shutdown()
    asyncio.run(scenario())
    files = stored_files(tmp_path / "data")
    assert len(files) == 1 and files[0].suffix == ".pcapng"


def test_a_v2_chunk_of_another_instance_is_refused_and_nothing_stored(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register(instance=INSTANCE))[0] == 200
            # The header says the registered instance, the signed body another one.
            code, answer = await send(client, v2_chunk(1, 1000, 3, instance="0bad" * 8), 2)
            assert (code, answer["error"]) == (400, "bad_chunk") and "instance" in answer["detail"]
            # The body's instance without the header is refused as well.
            code, _ = await send(client, v2_chunk(2, 1000, 3), 2, instance="")
            assert code == 400
            state = client.vsensor.sensors["node-1"]
            assert (state.chunks, state.packets, state.kernel) == (0, 0, {})
            assert client.vsensor.metrics.chunks["malformed"] == 2
            assert stored_files(tmp_path / "data") == []
            # The same sequence from the right instance is stored: nothing was remembered.
            assert await send(client, v2_chunk(1, 1000, 3), 2) == (200, {"stored": 3})
    asyncio.run(scenario())
