"""What a store worker costs per packet: the figure for ``docs/cluster.md``'s sizing.

Starts a JetStream cluster of three ``nats-server`` processes on loopback (the tests' settings,
three copies of everything), publishes N chunks of 64-byte packets for a few sensors into the
chunk stream exactly as replicas do, then starts ``ossensor-vsensor store`` and times it until
the stream is empty (every chunk stored and acknowledged). The worker's CPU is read from
``/proc/<pid>/stat`` (user + system) from just before its first partition to the empty stream,
so start-up (imports, the stream and buckets) is measured apart; the nats-servers' CPU over the
same span is printed beside it.

Run: ``python3 -m bench.cluster_store [--chunks N] [--packets P] [--sensors S]`` (from the
repository root, packages installed, nats-server on the PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk, ChunkCodec
from ossensor_vsensor.cluster import STREAM, SUBJECT_PREFIX, partition
from ossensor_vsensor.cluster.connection import Cluster, ClusterSettings
from ossensor_vsensor.cluster.names import token
from tests.helpers.nats import nats_cluster

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def frame(n: int) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP frame carrying ``n``."""
    payload = n.to_bytes(8, "big") + os.urandom(14)  # 14 + 20 + 8 + 22 = 64 bytes
    udp = (40000).to_bytes(2, "big") + (40001).to_bytes(2, "big") + \
        (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    ip = bytes([0x45, 0, 0, 28 + len(payload), 0, 0, 0, 0, 64, 17, 0, 0,
                192, 0, 2, 10, 192, 0, 2, 20])
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + udp


async def publish(urls: str, chunks: int, packets: int, sensors: int) -> int:
    """Every chunk into the stream; returns the bytes published."""
    cluster = await Cluster.connect(ClusterSettings(tuple(urls.split(",")), replicas=3,
                                                    name="bench-publisher"))
    codec, total = ChunkCodec(), 0
    names = [f"bench.node-{i}" for i in range(sensors)]
    start = 1_764_262_800_000_000_000
    for sequence in range(1, chunks // sensors + 1):
        for sensor in names:
            frames = [(start + i, 64, frame(sequence * packets + i)) for i in range(packets)]
            chunk = Chunk(sensor, sequence, (PacketBatch.from_frames("eth0", 2, 1, frames),),
                          start)
            body = codec.encode(chunk)
            total += len(body)
            await cluster.js.publish(
                f"{SUBJECT_PREFIX}.{partition(sensor)}.{token(sensor)}", body,
                headers={"Ossensor-Sensor": sensor, "Ossensor-Sequence": str(sequence),
                         "Nats-Msg-Id": f"{token(sensor)}.{sequence}"})
    await cluster.close()
    return total


async def measure(urls: str, worker: int, servers: list[int],
                  started: Path) -> tuple[float, float, float]:
    """(worker CPU s, servers' CPU s, wall s) from the worker's first partition to an empty
    stream, watched over one connection."""
    import nats
    nc = await nats.connect(urls.split(","))
    js = nc.jetstream()
    while "took p" not in started.read_text():
        await asyncio.sleep(0.01)
    cpu0, nats0, t0 = cpu_seconds(worker), sum(map(cpu_seconds, servers)), time.monotonic()
    while (await js.stream_info(STREAM)).state.messages:
        await asyncio.sleep(0.2)
    cpu1, nats1, t1 = cpu_seconds(worker), sum(map(cpu_seconds, servers)), time.monotonic()
    await nc.close()
    return cpu1 - cpu0, nats1 - nats0, t1 - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--packets", type=int, default=2000, help="packets per chunk")
    parser.add_argument("--sensors", type=int, default=4)
    parser.add_argument("--profile", metavar="FILE",
                        help="run the worker under cProfile, its statistics written to FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, \
            nats_cluster(Path(folder) / "nats", 3) as nats:
        sent = asyncio.run(publish(nats.urls, args.chunks, args.packets, args.sensors))
        chunks = args.chunks // args.sensors * args.sensors
        print(f"published {chunks} chunks of {args.packets} 64-byte packets "
              f"({sent / 1e6:.1f} MB encoded)")
        log = open(Path(folder) / "worker.log", "w")
        worker = subprocess.Popen(
            [sys.executable, *(["-m", "cProfile", "-o", args.profile] if args.profile else []),
             "-m", "ossensor_vsensor.cli", "store", "--nats", nats.urls,
             "--data-dir", str(Path(folder) / "data"), "--worker", "bench"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            servers = [p.pid for p in nats.procs if p is not None]
            cpu, nats_cpu, wall = asyncio.run(measure(nats.urls, worker.pid, servers,
                                                      Path(folder) / "worker.log"))
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        total = chunks * args.packets
        print(f"store worker: {total} packets in {wall:.1f} s, {total / wall:,.0f} packets/s, "
              f"CPU {cpu:.2f} s = {cpu / total * 1e6:.2f} us per packet; 3 nats-servers "
              f"meanwhile {nats_cpu:.2f} s = {nats_cpu / total * 1e6:.2f} us per packet")


if __name__ == "__main__":
    main()
