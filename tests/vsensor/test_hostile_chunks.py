"""Chunks that lie, from a holder of the key, against a real vSensor over real TLS.

Each gets ``400 bad_chunk``, writes nothing, leaves every file as it was, and never stops the
chunks after it (issue 15, item 1). The examples are the ones the issue observed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import zstandard

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk
from ossensor_core.wire.chunk import CODEC_NONE, CODEC_ZSTD, MAGIC, ChunkCodec
from ossensor_core.wire.names import MAX_CHUNK_BYTES, MAX_CHUNK_LINKTYPES, PATH_CHUNKS
from tests.helpers.vsensor import (SENSOR, ether_frame, make_chunk, running, settings,
                                   stored_files)

SEQUENCE = "X-Ossensor-Chunk-Sequence"
# struct tpacket3_hdr: where the fields a liar changes are
AT_NEXT, AT_SNAPLEN, AT_LEN, AT_MAC = 0, 12, 16, 24


def _name(text: str) -> bytes:
    return struct.pack("<H", len(text.encode())) + text.encode()


def chunk_body(batches: list[tuple[int, int, bytes]], sequence: int,
               sensor: str = SENSOR) -> bytes:
    """A v1 chunk body from ``(link type, packets claimed, record data)``, as a liar builds it."""
    parts = [struct.pack("<QQ", sequence, 0), _name(sensor), struct.pack("<I", len(batches))]
    for linktype, packets, data in batches:
        parts += [_name("eth0"), struct.pack("<IHII", 2, linktype, packets, len(data)), data]
    return b"".join(parts)


def wrap(body: bytes, codec: int = CODEC_NONE) -> bytes:
    return struct.pack("<4sBBHI", MAGIC, 1, codec, 0, len(body)) + body


def records(count: int = 3) -> bytearray:
    """``count`` genuine records (Ethernet frames), to be falsified."""
    batch = PacketBatch.from_frames("eth0", 2, 1, [(i, len(ether_frame(i)), ether_frame(i))
                                                    for i in range(count)])
    return bytearray(batch.data)


def lying(field: int, value: int, record: int = 1) -> bytes:
    """Three records, the field at ``field`` of record ``record`` set to ``value``."""
    data = records()
    size = len(data) // 3
    struct.pack_into("<I" if field != AT_MAC else "<H", data, record * size + field, value)
    return bytes(data)


def post_chunk(client, payload: bytes, sequence: int):
    return client.post(PATH_CHUNKS, payload, headers={SEQUENCE: str(sequence)})


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def readable_by_tshark_and_tcpdump(path: Path, tcpdump: bool = True) -> int:
    """The number of packets tshark reads from ``path``; tcpdump must read it too."""
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "damaged" not in done.stderr, done.stderr
    if not tcpdump:
        return len(done.stdout.split())
    dump = subprocess.run(["tcpdump", "-r", str(path), "-nn"], capture_output=True, text=True,
                          timeout=60)
    assert dump.returncode == 0 and "damaged" not in dump.stderr, dump.stderr
    return len(done.stdout.split())


def batch_longer_than_the_body(sequence: int) -> bytes:
    data = bytes(records(1))
    body = chunk_body([(1, 1, data)], sequence)
    at = len(body) - len(data) - 4  # the batch's data length
    return body[:at] + struct.pack("<I", len(data) + 1) + body[at + 4:]


LIES = {
    "a million packets over one record": lambda: [(1, 1_000_000, bytes(records(1)))],
    "more packets than records": lambda: [(1, 5, bytes(records(3)))],
    "captured length past the record": lambda: [(1, 3, lying(AT_SNAPLEN, 4000))],
    "frame offset past the record": lambda: [(1, 3, lying(AT_MAC, 4000))],
    "captured length near 2**32": lambda: [(1, 3, lying(AT_SNAPLEN, 2**32 - 2))],
    "wire length near 2**32 (a VLAN tag would overflow it)": lambda: [
        (1, 3, lying(AT_LEN, 2**32 - 2))],
    "captured length over the wire length": lambda: [(1, 3, lying(AT_LEN, 10))],
    "next offset pointing back": lambda: [(1, 3, lying(AT_NEXT, 8, record=0))],
    "next offset past the data": lambda: [(1, 3, lying(AT_NEXT, 1 << 20, record=0))],
    "the last record ending before the data": lambda: [(1, 2, bytes(records(3)))],
    f"{MAX_CHUNK_LINKTYPES * 20 - 20} link types": lambda: [
        (300 + n, 1, bytes(records(1))) for n in range(MAX_CHUNK_LINKTYPES * 20 - 20)],
}


@pytest.mark.parametrize("lie", sorted([*LIES, "a batch longer than the body"]))
def test_a_lying_chunk_gets_400_writes_nothing_and_the_next_is_stored(tmp_path, tls, caplog,
                                                                      lie):
    data = tmp_path / "data"

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(1, packets=4)))[:2] == (
                200, {"stored": 4})
            before = {p: p.read_bytes() for p in stored_files(data)}
            descriptors = open_descriptors()
            body = (batch_longer_than_the_body(2) if lie == "a batch longer than the body"
                    else chunk_body(LIES[lie](), 2))
            status, answer, _ = await post_chunk(client, wrap(body), 2)
            assert (status, answer["error"]) == (400, "bad_chunk"), (lie, answer)
            assert answer["detail"]
            assert {p: p.read_bytes() for p in stored_files(data)} == before
            assert open_descriptors() <= descriptors
            # The refusal never stops the chunks after it, nor the retry of the sequence.
            assert (await client.send_chunk(make_chunk(2, packets=2)))[:2] == (
                200, {"stored": 2})
            assert client.vsensor.sensors[SENSOR].packets == 6
        files = stored_files(data)
        assert sum(readable_by_tshark_and_tcpdump(p) for p in files) == 6

    run_with_tools(scenario)
    refusals = [r for r in caplog.records if "bad_chunk" in r.getMessage()]
    assert len(refusals) == 1 and not any(r.exc_info for r in caplog.records)


def run_with_tools(scenario) -> None:
    if not (shutil.which("tshark") and shutil.which("tcpdump")):
        pytest.skip("tshark and tcpdump are needed")
    asyncio.run(scenario())


@functools.lru_cache(maxsize=2)
def _bomb(size: int, declare: bool) -> bytes:
    """A zstd frame of a genuine chunk body whose batches go on to ``size`` bytes: 64 KiB batches
    of real records, repeated (so the frame is small). ``declare``: the frame states its size."""
    frame = ether_frame(0) + bytes(1000)
    batch = PacketBatch.from_frames("eth0", 2, 1, [(i, len(frame), frame)
                                                   for i in range((64 << 10) // 1072)])
    one = _name("eth0") + struct.pack("<IHII", 2, 1, batch.count, len(batch.data)) + batch.data
    count = size // len(one)
    head = struct.pack("<QQ", 1, 0) + _name(SENSOR) + struct.pack("<I", count)
    total = len(head) + count * len(one)
    out = bytearray()

    class Sink:
        def write(self, data) -> int:
            out.extend(data)
            return len(data)

    compressor = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    with compressor.stream_writer(Sink(), size=total if declare else -1,
                                  closefd=False) as writer:
        writer.write(head)
        for _ in range(count):
            writer.write(one)
    return wrap(bytes(out), CODEC_ZSTD)


@pytest.mark.parametrize("declare", [True, False], ids=["size declared", "size unknown"])
def test_a_zstd_frame_of_2_gib_is_refused_within_the_chunk_limit(tmp_path, tls, declare):
    """Measured in a separate process (the CLI) by its peak resident size (VmHWM)."""
    import ssl
    from tests.vsensor.test_cli import free_port, start
    payload = _bomb(2 << 30, declare)
    assert len(payload) < 1 << 20
    port = free_port()
    process = start(tmp_path, port, "vsensor.log")
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "data" / ".tls" /
                                                       "vsensor-cert.pem"))
        status, answer = _post_sync(port, context, payload, register=True)
        assert status == 200, answer
        baseline = _peak_rss(process.pid)
        status, answer = _post_sync(port, context, payload)
        assert (status, answer["error"]) == (400, "bad_chunk"), answer
        grown = _peak_rss(process.pid) - baseline
        print(f"2 GiB zstd frame ({'declared' if declare else 'unknown size'}): "
              f"{len(payload)} bytes sent, peak RSS grew {grown / 2**20:.1f} MiB")
        # The limit (64 MiB of batch data) plus a fixed margin (zstd window, buffers).
        assert grown < MAX_CHUNK_BYTES + (32 << 20)
    finally:
        process.terminate()
        process.wait(timeout=20)


def _post_sync(port: int, context, payload: bytes, register: bool = False):
    import json
    import urllib.error
    import urllib.request
    from ossensor_core.wire.signing import PATH_REGISTER, sign
    from tests.helpers.vsensor import KEY
    if register:
        path = PATH_REGISTER
        payload = json.dumps({"sensor": SENSOR, "versions": [1], "addresses": [],
                              "interfaces": ["eth0"]}).encode()
    else:
        path = PATH_CHUNKS
    headers = {**sign(KEY, "POST", path, payload, SENSOR), "X-Ossensor-Protocol": "1",
               SEQUENCE: "1"}
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=payload,
                                     method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_decoding_a_2_gib_frame_allocates_at_most_the_limit():
    """The decoder itself, measured with tracemalloc: the batch data read before the refusal,
    never the declared size."""
    import tracemalloc
    for declare in (True, False):
        payload = _bomb(2 << 30, declare)
        tracemalloc.start()
        try:
            with pytest.raises(ValueError):
                ChunkCodec().decode(payload)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        print(f"declared={declare}: decode peak {peak / 2**20:.1f} MiB")
        assert peak < MAX_CHUNK_BYTES + (1 << 20)
