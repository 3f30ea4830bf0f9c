"""Limits of the vSensor process (issue 15, items 1 and 5): descriptors per sensor and of
silent sensors, the open-files limit, file sizes at rotation, recovery's memory."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
import tracemalloc

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk
from ossensor_core.wire.names import MAX_CHUNK_LINKTYPES
from ossensor_vsensor.store import JOURNAL, SensorStore, recover
from tests.helpers.vsensor import SENSOR, ether_frame, make_chunk, running, settings, stored_files
from tests.vsensor.test_hostile_chunks import readable_by_tshark_and_tcpdump, run_with_tools


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def linktype_chunk(sequence: int, linktypes: range, sensor: str = SENSOR) -> Chunk:
    batches = tuple(PacketBatch.from_frames("eth0", 2, linktype, [(sequence, 60, ether_frame(1))])
                    for linktype in linktypes)
    return Chunk(sensor, sequence, batches, 0)


def test_open_files_per_sensor_stay_bounded_across_many_link_types(tmp_path, tls):
    data = tmp_path / "data"

    async def scenario():
        async with running(settings(tmp_path), tls) as client:
            assert (await client.register())[0] == 200
            assert (await client.send_chunk(make_chunk(1)))[0] == 200
            before = descriptors()
            # 300 link types over 30 chunks of 10: at most MAX_CHUNK_LINKTYPES files open.
            for n in range(30):
                chunk = linktype_chunk(2 + n, range(300 + 10 * n, 310 + 10 * n))
                status, answer, _ = await client.send_chunk(chunk)
                assert (status, answer) == (200, {"stored": 10})
                assert descriptors() - before <= MAX_CHUNK_LINKTYPES
            print(f"300 link types: {descriptors() - before} more descriptors")
            parts = [p for p in stored_files(data) if p.name.endswith(".part")]
            assert len(parts) <= MAX_CHUNK_LINKTYPES
        files = stored_files(data)
        assert len(files) == 301  # one per link type, plus the Ethernet one
        assert all(p.suffix == ".pcapng" for p in files)
        # A sample (each reading takes a tshark start); tcpdump knows no link type 300.
        sample = files[:4] + files[-2:]
        assert sum(readable_by_tshark_and_tcpdump(p, tcpdump=p.name.endswith("-ether.pcapng"))
                   for p in sample) == 3 + 5
    run_with_tools(scenario)


def test_silent_sensors_keep_no_descriptor(tmp_path, tls):
    async def scenario():
        async with running(settings(tmp_path, rotate_seconds=0.3), tls) as client:
            for n in range(40):
                assert (await client.register(f"node-{n}"))[0] == 200
            before = descriptors()  # the server, its connection to this client
            for n in range(40):
                name = f"node-{n}"
                assert (await client.send_chunk(make_chunk(1, sensor=name,
                                                           raw_packets=1)))[0] == 200
            busy = descriptors() - before
            assert busy >= 40 * 2  # two files and a journal each, while they send
            deadline = time.monotonic() + 10
            # The store closes (descriptors) on a worker thread, then is dropped: wait for both.
            while (descriptors() > before or client.vsensor.stores.stores) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            print(f"40 sensors: {busy} descriptors while sending, "
                  f"{descriptors() - before} once silent")
            assert descriptors() <= before
            assert not client.vsensor.stores.stores
            # A silent sensor that speaks again: its store and journal are opened again, a
            # retry of a chunk stored before is still recognised.
            assert (await client.send_chunk(make_chunk(1, sensor="node-7")))[:2] == (
                200, {"duplicate": True})
            assert (await client.send_chunk(make_chunk(2, sensor="node-7")))[:2] == (
                200, {"stored": 3})
    asyncio.run(scenario())


def test_a_file_grows_past_its_rotation_size_by_at_most_one_chunk(tmp_path, tls):
    data = tmp_path / "data"
    rotate = 4096

    async def scenario():
        largest_chunk, stored = 0, 0
        async with running(settings(tmp_path, rotate_bytes=rotate), tls) as client:
            assert (await client.register())[0] == 200
            for n in range(1, 40):
                status, _, _ = await client.send_chunk(make_chunk(n, packets=1 + n % 7))
                assert status == 200
                now = client.vsensor.sensors[SENSOR].bytes  # pcapng bytes stored so far
                largest_chunk, stored = max(largest_chunk, now - stored), now
        sizes = [p.stat().st_size for p in stored_files(data)]
        assert len(sizes) > 3
        print(f"rotation at {rotate}: files of {sorted(sizes)} bytes, chunks up to "
              f"{largest_chunk}")
        assert max(sizes) <= rotate + largest_chunk, sizes
    asyncio.run(scenario())


def test_recovery_walks_a_part_file_without_reading_it_whole(tmp_path):
    store = SensorStore(tmp_path, "node-1", rotate_bytes=1 << 40, rotate_seconds=3600)
    frame = ether_frame(0) + bytes(1400)
    batch = PacketBatch.from_frames("eth0", 2, 1, [(i, len(frame), frame) for i in range(2000)])
    for sequence in range(1, 11):
        store.write_chunk(Chunk("node-1", sequence, (batch,), 0))
    (part,) = stored_files(tmp_path, "node-1")
    acknowledged = part.stat().st_size
    with open(part, "ab") as handle:  # a chunk written, not acknowledged: the process died
        handle.write(bytes(5000))
    # What SIGKILL leaves: the descriptors go, nothing is completed.
    for opened in list(store._files._files.values()):
        os.close(opened.out.fd)
    os.close(store._journal)
    size = part.stat().st_size
    assert size > 28 << 20
    tracemalloc.start()
    try:
        lines = recover(tmp_path / "node-1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"recovery of a {size / 2**20:.1f} MiB .part file: peak {peak / 2**20:.2f} MiB")
    assert peak < 3 << 20
    (done,) = stored_files(tmp_path, "node-1")
    assert done.suffix == ".pcapng" and done.stat().st_size == acknowledged, lines
    assert (tmp_path / "node-1" / JOURNAL).exists()


def test_the_cli_raises_the_open_files_limit_to_the_hard_limit(tmp_path):
    from tests.vsensor.test_cli import free_port
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))

    env = {k: v for k, v in os.environ.items() if not k.startswith("VSENSOR_")}
    env["VSENSOR_HMAC_KEY"] = "Kx9secretHMACkey42"
    log = tmp_path / "vsensor.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ossensor_vsensor.cli", "--listen",
             f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data")],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lower)
    deadline = time.monotonic() + 20
    while "listening on" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    try:
        limits = open(f"/proc/{process.pid}/limits").read()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = log.read_text()
    assert lowered == hard or f"open-files limit raised from {lowered} to {hard}" in text, text
