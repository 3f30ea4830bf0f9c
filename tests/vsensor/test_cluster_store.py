"""The store worker (``ossensor-vsensor store``) against a real 3-node JetStream cluster.

Chunk messages are published here exactly as the contract says a replica does
(``ossensor_vsensor/cluster/__init__.py``); real worker processes store them; the files are
read back with tshark and tcpdump. Every packet carries ``<sensor>|<sequence>|<index>`` as its
UDP payload, so "every packet exactly once, in order" is checked packet by packet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk, ChunkCodec
from ossensor_vsensor.cluster import PARTITIONS, STREAM, SUBJECT_PREFIX, partition
from ossensor_vsensor.cluster.connection import Cluster, ClusterSettings
from ossensor_vsensor.cluster.names import token
from ossensor_vsensor.cluster.parts import BadMessage, Header, Reassembly, read_headers
from ossensor_vsensor.store import recover, safe_name
from tests.helpers.nats import nats_cluster, needs_nats

LEASE = "3"
#: Parts as a replica cuts them: under the servers' max_payload (1 MiB) with room for headers.
PART_BYTES = 1_000_000


def frame(payload: bytes) -> bytes:
    """Ethernet/IPv4/UDP (ports tshark has no dissector for: the payload shows as data)."""
    udp = (40000).to_bytes(2, "big") + (40001).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    length = 20 + len(udp)
    ip = bytes([0x45, 0, length >> 8, length & 0xFF, 0, 0, 0, 0, 64, 17, 0, 0,
                192, 0, 2, 10, 192, 0, 2, 20])
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + udp


def chunk_body(sensor: str, sequence: int, packets: int, pad: int = 0) -> bytes:
    """A chunk of numbered packets, encoded as the sensor sends it (``pad`` random bytes per
    packet make it incompressible, to get bodies over max_payload)."""
    start = 1_764_262_800_000_000_000 + sequence * 1_000_000
    frames = []
    for i in range(packets):
        data = frame(f"{sensor}|{sequence}|{i}|".encode() + os.urandom(pad))
        frames.append((start + i * 1000, len(data), data))
    chunk = Chunk(sensor, sequence, (PacketBatch.from_frames("eth0", 2, 1, frames),), start)
    return ChunkCodec().encode(chunk)


async def publish(js, sensor: str, sequence: int, body: bytes, msg_id: str | None = None,
                  subject: str | None = None) -> None:
    """As a replica does: one message, or consecutive parts when over max_payload."""
    subject = subject or f"{SUBJECT_PREFIX}.{partition(sensor)}.{token(sensor)}"
    base = msg_id or f"{token(sensor)}.{sequence}"
    headers = {"Ossensor-Sensor": sensor, "Ossensor-Sequence": str(sequence)}
    if len(body) <= PART_BYTES:
        await js.publish(subject, body, headers={**headers, "Nats-Msg-Id": base})
        return
    parts = [body[i:i + PART_BYTES] for i in range(0, len(body), PART_BYTES)]
    for i, part in enumerate(parts, 1):
        await js.publish(subject, part, headers={
            **headers, "Ossensor-Part": f"{i}/{len(parts)}", "Nats-Msg-Id": f"{base}.{i}"})


class Worker:
    """``ossensor-vsensor store`` as a process, its log in ``folder/<name>.log``."""

    def __init__(self, folder: Path, urls: str, name: str, *args: str) -> None:
        self.name, self.data, self.log = name, folder / name, folder / f"{name}.log"
        self.urls, self.args = urls, args
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ossensor_vsensor.cli", "store", "--nats", self.urls,
                 "--data-dir", str(self.data), "--worker", self.name, "--nats-replicas", "3",
                 "--lease-seconds", LEASE, "--rotate-seconds", "600", *self.args],
                stdout=log, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def stored(*data_dirs: Path) -> dict[str, list[str]]:
    """Every packet payload prefix (``sensor|sequence|index``) per sensor folder, file by file
    in name order, as tshark reads them; tcpdump must read every file too."""
    found: dict[str, list[str]] = {}
    for data in data_dirs:
        for path in sorted(data.glob("*/*.pcapng")):
            done = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-q"],
                                  capture_output=True, timeout=60)
            assert done.returncode == 0, done.stderr[-500:]
            fields = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "data.data"],
                                    capture_output=True, text=True, timeout=60, check=True)
            for line in fields.stdout.split():
                text = bytes.fromhex(line)
                found.setdefault(path.parent.name, []).append(
                    b"|".join(text.split(b"|")[:3]).decode(errors="replace"))
    return found


def expected(sensor: str, sequences, packets: int) -> list[str]:
    return [f"{sensor}|{s}|{i}" for s in sequences for i in range(packets)]


async def drained(js, timeout: float = 120) -> None:
    """Until the stream is empty: every message acknowledged by the store (interest
    retention removes it then)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.stream_info(STREAM)
        if info.state.messages == 0:
            return
        assert time.monotonic() < deadline, f"{info.state.messages} messages left in the stream"
        await asyncio.sleep(0.3)


async def connect(urls: str, replicas: int = 3) -> Cluster:
    return await Cluster.connect(ClusterSettings(tuple(urls.split(",")), replicas=replicas,
                                                 name="test-publisher"))


@needs_nats
def test_chunks_stored_once_in_order_parts_duplicates_and_garbage(tmp_path):
    sensors = ["node.one", "node two", "n3"]

    async def scenario(urls: str) -> Worker:
        cluster = await connect(urls)
        js = cluster.js
        worker = Worker(tmp_path, urls, "w1")
        for sequence in range(1, 11):
            for sensor in sensors:
                await publish(js, sensor, sequence, chunk_body(sensor, sequence, 20))
        # A retry beyond JetStream's window: the same sequence under another message id.
        await publish(js, "node.one", 5, chunk_body("node.one", 5, 20), msg_id="again.5")
        # Garbage on node.one's subject, a message without headers, then more chunks: the
        # partition goes on.
        subject = f"{SUBJECT_PREFIX}.{partition('node.one')}.{token('node.one')}"
        await js.publish(subject, b"\x00garbage" * 100, headers={
            "Ossensor-Sensor": "node.one", "Ossensor-Sequence": "999",
            "Nats-Msg-Id": "garbage"})
        await js.publish(subject, b"no headers")
        # A chunk over max_payload in three parts, with another sensor's chunk between them.
        big = chunk_body("node.one", 11, 300, pad=8000)
        assert 2 * PART_BYTES < len(big) <= 3 * PART_BYTES
        parts = [big[i:i + PART_BYTES] for i in range(0, len(big), PART_BYTES)]
        headers = {"Ossensor-Sensor": "node.one", "Ossensor-Sequence": "11"}
        for i, part in enumerate(parts, 1):
            await js.publish(subject, part, headers={
                **headers, "Ossensor-Part": f"{i}/3", "Nats-Msg-Id": f"{token('node.one')}.11.{i}"})
            if i == 1:
                await publish(js, "node two", 11, chunk_body("node two", 11, 20))
        for sensor in sensors:
            await publish(js, sensor, 12, chunk_body(sensor, 12, 20))
        # A chunk whose last part failed: the sensor's retry adds it later (the others are
        # JetStream duplicates then).
        late = chunk_body("node.one", 13, 300, pad=8000)
        parts = [late[i:i + PART_BYTES] for i in range(0, len(late), PART_BYTES)]
        headers = {"Ossensor-Sensor": "node.one", "Ossensor-Sequence": "13"}
        for attempt in ([1, 2], [1, 2, 3]):
            for i in attempt:
                await js.publish(subject, parts[i - 1], headers={
                    **headers, "Ossensor-Part": f"{i}/3",
                    "Nats-Msg-Id": f"{token('node.one')}.13.{i}"})
            await asyncio.sleep(3)
        await drained(js)
        await cluster.close()
        return worker

    with nats_cluster(tmp_path / "nats", 3) as nats:
        worker = asyncio.run(scenario(nats.urls))
        assert worker.stop() == 0, worker.text()[-3000:]
    log = worker.text()
    assert "refused chunk 999 of 'node.one'" in log, log[-3000:]
    assert "refused chunk ? of '?': missing or overlong Ossensor-Sensor header" in log
    assert "stopped: 36 chunks (1280 packets) stored, 1 duplicates, 2 refused" in log
    files = stored(worker.data)
    assert sorted(files) == sorted(safe_name(s) for s in sensors)
    files = {s: files[safe_name(s)] for s in sensors}
    assert files["node.one"] == expected("node.one", range(1, 11), 20) + \
        expected("node.one", [11], 300) + expected("node.one", [12], 20) + \
        expected("node.one", [13], 300)
    assert files["node two"] == expected("node two", range(1, 13), 20)
    assert files["n3"] == expected("n3", [*range(1, 11), 12], 20)
    assert not list(worker.data.glob("*/*.part"))


@needs_nats
def test_a_killed_worker_restarted_stores_every_chunk_exactly_once(tmp_path):
    """SIGKILL mid-stream, started again under its name; meanwhile one NATS server is
    SIGKILLed and started again while more chunks come."""
    sensors = ["a.b", "c d"]

    async def scenario(urls: str, nats) -> Worker:
        cluster = await connect(urls)
        for sequence in range(1, 301):
            for sensor in sensors:
                await publish(cluster.js, sensor, sequence, chunk_body(sensor, sequence, 50))
        worker = Worker(tmp_path, urls, "w1")
        deadline = time.monotonic() + 60
        journals = [worker.data / safe_name(s) / ".chunks" for s in sensors]
        while sum(len(j.read_text().splitlines()) for j in journals if j.exists()) < 100:
            assert time.monotonic() < deadline, worker.text()[-2000:]
            await asyncio.sleep(0.01)
        worker.stop(signal.SIGKILL)
        info = await cluster.js.stream_info(STREAM)
        assert info.state.messages > 0  # killed mid-stream
        worker.start()  # the same name and volume: its partitions back at once
        nats.kill(1)
        for sequence in range(301, 401):
            for sensor in sensors:
                await retried(cluster.js, sensor, sequence, chunk_body(sensor, sequence, 50))
        nats.start(1)
        # Messages delivered to the killed worker come back after the consumers' ack_wait.
        await drained(cluster.js, timeout=150)
        await cluster.close()
        return worker

    with nats_cluster(tmp_path / "nats", 3) as nats:
        worker = asyncio.run(scenario(nats.urls, nats))
        assert worker.stop() == 0
    log = worker.text()
    assert "recovered" in log  # its .part files, cut back to the journal and completed
    files = stored(worker.data)
    for sensor in sensors:
        assert files[safe_name(sensor)] == expected(sensor, range(1, 401), 50)


@needs_nats
def test_rotation_and_retention_as_in_single_mode(tmp_path):
    """--rotate-bytes completes files as chunks come, --retain-bytes deletes the oldest
    completed ones: what stays is the newest packets, in order (one NATS server, one copy)."""

    async def scenario(urls: str) -> Worker:
        cluster = await connect(urls, replicas=1)
        worker = Worker(tmp_path, urls, "w1", "--nats-replicas", "1", "--rotate-bytes", "20000",
                        "--retain-bytes", "60000")
        for sequence in range(1, 101):
            await publish(cluster.js, "r.s", sequence, chunk_body("r.s", sequence, 20))
        await drained(cluster.js)
        await cluster.close()
        deadline = time.monotonic() + 30
        while sum(p.stat().st_size for p in worker.data.glob("*/*.pcapng")) > 60000:
            assert time.monotonic() < deadline, worker.text()[-2000:]
            time.sleep(0.2)
        return worker

    with nats_cluster(tmp_path / "nats", 1) as nats:
        worker = asyncio.run(scenario(nats.urls))
        assert worker.stop() == 0
    assert "retention: deleted" in worker.text()
    kept = stored(worker.data)["r.s"]
    everything = expected("r.s", range(1, 101), 20)
    assert 0 < len(kept) < len(everything) and everything[-len(kept):] == kept


async def retried(js, sensor: str, sequence: int, body: bytes) -> None:
    """:func:`publish` retried as a sensor retries through a replica while NATS elects new
    leaders: the same message ids, so JetStream keeps one copy."""
    for _ in range(60):
        try:
            await publish(js, sensor, sequence, body)
            return
        except Exception:
            await asyncio.sleep(0.5)
    raise AssertionError(f"could not publish {sensor} {sequence}")


@needs_nats
def test_two_workers_share_partitions_and_one_takes_over_when_the_other_dies(tmp_path):
    sensors = [f"sensor.{i}" for i in range(40)]

    async def reports(kv, names) -> dict[str, dict]:
        return {n: json.loads((await kv.get(f"worker.{n}")).value) for n in names}

    async def scenario(urls: str) -> tuple[Worker, Worker]:
        cluster = await connect(urls)
        kv = cluster.kv("ossensor-store")
        first, second = Worker(tmp_path, urls, "w1"), Worker(tmp_path, urls, "w2")
        deadline = time.monotonic() + 60
        while True:  # balanced: 16 each, disjoint
            try:
                held = await reports(kv, ["w1", "w2"])
            except Exception:
                held = {}
            if held and all(len(r["partitions"]) == PARTITIONS // 2 for r in held.values()):
                break
            assert time.monotonic() < deadline, (held, first.text()[-2000:])
            await asyncio.sleep(0.5)
        assert not set(held["w1"]["partitions"]) & set(held["w2"]["partitions"])
        for sensor in sensors:
            await publish(cluster.js, sensor, 1, chunk_body(sensor, 1, 10))
        await drained(cluster.js)
        second.stop(signal.SIGKILL)
        killed = time.monotonic()
        for sensor in sensors:
            await publish(cluster.js, sensor, 2, chunk_body(sensor, 2, 10))
        await drained(cluster.js)
        took = time.monotonic() - killed
        assert took >= float(LEASE) - 0.5, took  # not before the lease ran out (less a tick)
        report = (await reports(kv, ["w1"]))["w1"]
        deadline = time.monotonic() + 30
        while len(report["partitions"]) != PARTITIONS:
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.5)
            report = (await reports(kv, ["w1"]))["w1"]
        assert set(report["pending"].values()) == {0}
        await cluster.close()
        return first, second

    with nats_cluster(tmp_path / "nats", 3) as nats:
        first, second = asyncio.run(scenario(nats.urls))
        assert first.stop() == 0
    assert "held by 'w2'" in first.text()
    for folder in second.data.iterdir():  # what w2 does when it starts again on its volume
        recover(folder)
    files = stored(first.data, second.data)
    both = {}
    for folder in (first.data, second.data):
        for sensor in sensors:
            if (folder / safe_name(sensor)).is_dir():
                both.setdefault(sensor, []).append(folder.name)
    assert any(len(v) == 2 for v in both.values())  # w2's sensors went on on w1's volume
    for sensor in sensors:
        stored_once = sorted(files.get(safe_name(sensor), []))
        assert stored_once == sorted(expected(sensor, [1, 2], 10)), sensor


# -- reading messages, without NATS ------------------------------------------------------------

def subject_of(sensor: str) -> str:
    return f"{SUBJECT_PREFIX}.{partition(sensor)}.{token(sensor)}"


@pytest.mark.parametrize("headers, subject, why", [
    (None, subject_of("a"), "Ossensor-Sensor"),
    ({"Ossensor-Sensor": "a" * 2000, "Ossensor-Sequence": "1"}, subject_of("a"),
     "Ossensor-Sensor"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "-1"}, subject_of("a"), "Ossensor-Sequence"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": str(1 << 64)}, subject_of("a"),
     "Ossensor-Sequence"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "١"}, subject_of("a"), "Ossensor-Sequence"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1"}, subject_of("b"), "not the sensor's"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1"},
     f"{SUBJECT_PREFIX}.p99.{token('a')}", "not the sensor's"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1", "Ossensor-Part": "0/2"},
     subject_of("a"), "Ossensor-Part"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1", "Ossensor-Part": "3/2"},
     subject_of("a"), "Ossensor-Part"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1", "Ossensor-Part": "1/100000"},
     subject_of("a"), "at most 130 parts"),
    ({"Ossensor-Sensor": "a", "Ossensor-Sequence": "1", "Ossensor-Part": "1/"},
     subject_of("a"), "Ossensor-Part"),
])
def test_headers_that_break_the_contract_are_refused_in_one_bounded_line(headers, subject, why):
    with pytest.raises(BadMessage) as refused:
        read_headers(subject, headers, max_parts=130)
    assert why in str(refused.value) and len(str(refused.value)) < 400


def test_headers_of_a_chunk_and_of_a_part():
    sensor = "node two.x"
    base = {"Ossensor-Sensor": sensor, "Ossensor-Sequence": str((1 << 64) - 1)}
    assert read_headers(subject_of(sensor), base, 130) == Header(sensor, (1 << 64) - 1)
    assert read_headers(subject_of(sensor), {**base, "Ossensor-Part": "2/3"}, 130) == \
        Header(sensor, (1 << 64) - 1, 2, 3)


def test_reassembly_in_any_order_with_repeats_and_other_chunks_between():
    parts = Reassembly(max_bytes=1000)
    first = [Header("a", 7, i, 3) for i in (1, 2, 3)]
    assert parts.add(first[1], "m2", b"BB") == (None, [], [])
    assert parts.add(Header("b", 1, 1, 2), "other", b"X") == (None, [], [])
    # Another copy of a held part is left alone; the same stream message delivered again
    # takes the place of the held delivery (its acknowledgement is the one that counts).
    assert parts.add(first[1], "copy", b"BB", stream_sequence=9) == (None, [], [])
    assert parts.add(first[0], "m1", b"AA", stream_sequence=10) == (None, [], [])
    assert parts.add(first[0], "m1 again", b"AA", stream_sequence=10) == (None, [], [])
    assert parts.add(first[2], "m3", b"C") == (b"AABBC", ["m2", "m1 again", "m3"], [])
    assert list(parts.open) == [("b", 1, 2)] and parts.size == 1


def test_reassembly_drops_the_oldest_beyond_its_count_and_bytes_and_what_waited_too_long():
    parts = Reassembly(max_bytes=10, max_open=2, wait=30.0)
    parts.add(Header("a", 1, 1, 2), "a1", b"12345", now=0.0)
    parts.add(Header("b", 1, 1, 2), "b1", b"1", now=1.0)
    _, _, dropped = parts.add(Header("c", 1, 1, 2), "c1", b"1", now=2.0)
    assert [(key, chunk.messages) for _, key, chunk in dropped] == [(("a", 1, 2), ["a1"])]
    _, _, dropped = parts.add(Header("d", 1, 1, 2), "d1", b"123456789", now=3.0)
    assert [key for _, key, _ in dropped] == [("b", 1, 2)]  # 3 open, then 10 bytes: in bounds
    assert parts.size == 10
    _, _, dropped = parts.add(Header("d", 1, 2, 3), "d2", b"12", now=3.0)  # another count
    assert [key for _, key, _ in dropped] == [("c", 1, 2), ("d", 1, 2)]  # over 10 bytes
    assert parts.size == 2
    parts.add(Header("e", 1, 1, 2), "e1", b"1", now=4.0)
    assert parts.expired(now=33.0) == []
    assert [key for _, key, _ in parts.expired(now=33.5)] == [("d", 1, 3)]
    assert [key for _, key, _ in parts.expired(now=34.5)] == [("e", 1, 2)]
    assert parts.size == 0 and not parts.open


def test_held_parts_are_kept_in_progress_every_so_often():
    parts = Reassembly(max_bytes=100)
    parts.add(Header("a", 1, 1, 3), "a1", b"1", now=0.0)
    parts.add(Header("a", 1, 2, 3), "a2", b"2", now=5.0)
    parts.add(Header("b", 1, 1, 2), "b1", b"1", now=15.0)
    assert parts.to_touch(20.0, now=19.0) == []
    assert parts.to_touch(20.0, now=20.0) == ["a1", "a2"]
    assert parts.to_touch(20.0, now=35.0) == ["b1"]
    assert parts.to_touch(20.0, now=40.0) == ["a1", "a2"]


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, culprit", [
    (["--nats", "nats://127.0.0.1:1", "--data-dir", "D", "--worker", "a b"], "--worker"),
    (["--nats", "nats://127.0.0.1:1", "--data-dir", "D", "--worker", ".x"], "--worker"),
    (["--nats", "http://x", "--data-dir", "D"], "--nats"),
    (["--nats", "nats://127.0.0.1:1", "--data-dir", "D", "--lease-seconds", "0"],
     "--lease-seconds"),
    (["--nats", "nats://127.0.0.1:1", "--data-dir", "D", "--nats-replicas", "7"],
     "--nats-replicas"),
    (["--data-dir", "D"], "--nats"),
])
def test_bad_options_exit_1_with_one_line_naming_the_option(tmp_path, args, culprit):
    args = [str(tmp_path / "data") if a == "D" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "ossensor_vsensor.cli", "store", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and culprit in done.stderr, done.stderr


def test_sigterm_while_no_nats_server_answers_exits_0(tmp_path):
    worker = Worker(tmp_path, "nats://127.0.0.1:1", "w1")
    deadline = time.monotonic() + 20
    while "open-files limit" not in worker.text():
        assert time.monotonic() < deadline, worker.text()
        time.sleep(0.05)
    time.sleep(1.0)
    started = time.monotonic()
    assert worker.stop() == 0, worker.text()
    assert time.monotonic() - started < 10
    assert "stopped before NATS could be reached" in worker.text()


class FaultyCodec(ChunkCodec):
    """Fault injection: decoding raises what it never should (a defect of ours) for chosen
    sequences: ``always`` on every delivery, ``once`` on the first only."""

    def __init__(self, always: int, once: int) -> None:
        super().__init__()
        self.always, self.once, self.failed_once = always, once, False

    def decode(self, body, max_bytes):
        chunk = super().decode(body, max_bytes)
        if chunk.sequence == self.always or (chunk.sequence == self.once
                                             and not self.failed_once):
            self.failed_once = self.failed_once or chunk.sequence == self.once
            raise RuntimeError(f"injected defect at chunk {chunk.sequence}")
        return chunk


@needs_nats
def test_a_message_that_brings_out_a_defect_is_retried_then_given_up(tmp_path, caplog):
    """A message whose decoding raises an unexpected exception comes back two seconds later
    and is terminated at its third delivery (it would otherwise come back after every
    ack_wait for ever); one that fails once is stored on its second delivery; the others are
    stored meanwhile. A real worker (in this process) on a real JetStream cluster."""
    from ossensor_vsensor.cluster import store_worker

    sensor = "node.one"

    async def scenario(urls: str) -> store_worker.StoreWorker:
        publisher = await connect(urls)  # makes the stream, as a replica does
        settings = store_worker.StoreWorkerSettings(
            tmp_path / "w1", ClusterSettings(tuple(urls.split(",")), replicas=3, name="w1"),
            rotate_seconds=600, lease_seconds=3.0)
        worker = store_worker.StoreWorker(settings)
        worker.codec = FaultyCodec(always=3, once=5)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        for sequence in range(1, 8):
            await publish(publisher.js, sensor, sequence, chunk_body(sensor, sequence, 10))
        deadline = time.monotonic() + 60
        while worker.counters.chunks + worker.counters.refused < 7:
            assert time.monotonic() < deadline, worker.counters
            await asyncio.sleep(0.2)
        await drained(publisher.js)
        stop.set()
        await asyncio.wait_for(running, 60)
        await publisher.close()
        return worker

    caplog.set_level(logging.INFO, logger="ossensor_vsensor")
    with nats_cluster(tmp_path / "nats", 3) as nats:
        worker = asyncio.run(scenario(nats.urls))
    assert (worker.counters.chunks, worker.counters.refused) == (6, 1), worker.counters
    text = caplog.text
    assert "chunk 3 of 'node.one' failed 3 times (RuntimeError: injected defect" in text
    assert "delivery 1 of 3" in text and "delivery 2 of 3" in text
    assert text.count("chunk 5 of 'node.one' failed") == 1
    assert "Traceback" in text  # the defect is shown once, when given up
    packets = stored(worker.settings.data_dir)[safe_name(sensor)]
    assert sorted(packets) == sorted(expected(sensor, [1, 2, 4, 5, 6, 7], 10))
