"""What ingest costs a vSensor per packet: cluster mode's replica (and its NATS servers) against
single mode, with real signed chunks over TLS on loopback.

One ``ossensor-vsensor`` process is started per mode (single: pcapng files in a temporary
folder; cluster: ``--nats`` to three local ``nats-server`` processes in one JetStream cluster,
three copies of the stream, as ``tests/helpers/nats.py`` configures them). A client in this
process registers one sensor, then posts ``--chunks`` chunks of ``--packets`` 64-byte frames
each (Ethernet/IPv4/UDP with random payloads, encoded and signed before the clock starts, so
the client's own work does not count), ``--in-flight`` at a time, like a sensor's transport
catching up. The CPU of the vSensor process and of the NATS servers is read from ``/proc``
(``bench.testbed.cpu_ns``: the run time of every thread) right before the first chunk and
right after the last answer, and divided by the packets sent.

Nothing consumes the stream (no store worker): the figure is the replica's ingest alone, and
the NATS servers' cost of taking in three copies. The stream is made large enough for the run.

    python -m bench.cluster_ingest [--chunks N] [--packets N] [--in-flight N] [--json FILE]

On the two-core test machine (shared with a running soak, so figures move by 10-20 % between
runs), microseconds of CPU per packet, ``--chunks C --packets P [--frame-bytes 512]`` with
C x P = 393,216 (64 bytes, two rounds) or 131,072 (512 bytes, one round):

======  ======================  =======  ===============  ===================================
frame   packets per chunk       single   cluster replica  three NATS servers, total (ms/MB)
======  ======================  =======  ===============  ===================================
64 B    1,024 (a node at 1k/s)  2.1-2.4  0.64-0.71        1.5-1.7 (55-64)
64 B    4,096                   1.5      0.26-0.28        0.8-0.9 (30-34)
64 B    32,768                  1.6      0.17-0.18        0.7 (26)
512 B   1,024                   3.4      3.0              17 (31)
512 B   4,096                   3.1      2.4-2.9          9-10 (16-18)
512 B   8,192                   3.4      2.5              10.5 (19)
======  ======================  =======  ===============  ===================================

The random payloads make a 64-byte packet about 27 bytes of compressed body and a 512-byte one
about 560 (incompressible). A replica's cost is about 0.5 ms per chunk (HTTPS, signature,
nonce, publish) plus, per byte of body, TLS, the signature's SHA-256, copies and the send to
NATS (about 4.5 ns a byte): no work per packet, but a 512-byte packet is 20 times the bytes.
The sensor cuts a chunk at 4 MiB of records or after one second, so a node sending fewer
packets a second pays the per-chunk part on fewer packets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme

from bench.testbed import cpu_ns
from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.chunk import Chunk, ChunkCodec
from ossensor_core.wire.names import CHUNK_MEDIA_TYPE
from ossensor_core.wire.signing import H_VERSION, PATH_CHUNKS, PATH_REGISTER, sign
from tests.helpers.nats import NatsCluster
from tests.helpers.vsensor_process import DOCUMENTATION_RANGES, free_port, start_local

KEY = "bench-cluster-ingest-key-0001"
SENSOR = "bench-node"


def frames(count: int, start_ns: int, frame_bytes: int) -> list[tuple[int, int, bytes]]:
    """Ethernet/IPv4/UDP frames of ``frame_bytes`` (at least 42) with random payloads."""
    size = frame_bytes - 42
    ip = (20 + 8 + size).to_bytes(2, "big")
    udp = (8 + size).to_bytes(2, "big")
    head = (b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00\x45\x00" + ip
            + b"\x00\x00\x00\x00\x40\x11\x00\x00\xc0\x00\x02\x0a\xc0\x00\x02\x14"
            + b"\x04\xd2\x16\x2e" + udp + b"\x00\x00")
    payload = os.urandom(count * size)
    return [(start_ns + i * 1000, frame_bytes, head + payload[i * size:(i + 1) * size])
            for i in range(count)]


def chunk_bodies(chunks: int, packets: int, frame_bytes: int) -> list[bytes]:
    codec = ChunkCodec()
    start = time.time_ns()
    bodies = []
    for sequence in range(1, chunks + 1):
        batch = PacketBatch.from_frames("eth0", 2, 1, frames(packets, start, frame_bytes))
        bodies.append(codec.encode(Chunk(SENSOR, sequence, (batch,), start), version=2))
        start += packets * 1000
    return bodies


async def post(session: aiohttp.ClientSession, base: str, path: str, body: bytes,
               headers: dict[str, str] | None = None) -> tuple[int, str]:
    signed = {H_VERSION: "1", **sign(KEY, "POST", path, body, SENSOR), **(headers or {})}
    async with session.post(base + path, data=body, headers=signed) as answer:
        return answer.status, await answer.text()


async def send(base: str, context: ssl.SSLContext, bodies: list[bytes], in_flight: int,
               measured: list[int]) -> dict[str, Any]:
    """Register, then post every body; CPU is sampled around the chunks alone."""
    message = {"sensor": SENSOR, "versions": [1], "software": "bench", "instance": "bench-1",
               "addresses": ["192.0.2.10"], "interfaces": ["eth0"]}
    connector = aiohttp.TCPConnector(ssl=context, limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        status, text = await post(session, base, PATH_REGISTER, json.dumps(message).encode(),
                                  {"X-Ossensor-Instance": "bench-1"})
        assert status == 200, text
        queue = list(enumerate(bodies, 1))
        queue.reverse()
        answers: dict[int, int] = {}

        async def worker() -> None:
            while queue:
                sequence, body = queue.pop()
                status, text = await post(session, base, PATH_CHUNKS, body, {
                    "Content-Type": CHUNK_MEDIA_TYPE, "X-Ossensor-Instance": "bench-1",
                    "X-Ossensor-Chunk-Sequence": str(sequence)})
                if status != 200:
                    raise AssertionError(f"chunk {sequence}: {status} {text[:200]}")
                answers[status] = answers.get(status, 0) + 1

        before = {pid: cpu_ns(pid) for pid in measured}
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.monotonic() - started
        after = {pid: cpu_ns(pid) for pid in measured}
    return {"seconds": elapsed, "cpu_ns": {pid: after[pid] - before[pid] for pid in measured}}


def trial(mode: str, folder: Path, bodies: list[bytes], packets: int, frame_bytes: int,
          in_flight: int) -> dict[str, Any]:
    folder.mkdir(parents=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    nats: NatsCluster | None = None
    args = ["--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem"),
            "--claims-allow", DOCUMENTATION_RANGES]
    if mode == "cluster":
        nats = NatsCluster(folder / "nats", 3)
        for i in range(3):
            nats.start(i)
        nats.wait_ready()
        args += ["--nats", nats.urls, "--nats-replicas", "3", "--replica", "bench-replica",
                 "--nats-stream-max-bytes", str(max(1 << 30, 2 * sum(map(len, bodies))))]
    port = free_port()
    process = start_local(folder, port, "vsensor.log", *args,
                          env={"VSENSOR_HMAC_KEY": KEY,
                               "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    try:
        servers = [p.pid for p in (nats.procs if nats else []) if p is not None]
        result = asyncio.run(send(f"https://127.0.0.1:{port}", client, bodies, in_flight,
                                  [process.pid, *servers]))
    finally:
        process.terminate()
        process.wait(timeout=30)
        if nats is not None:
            nats.stop()
    sent = len(bodies) * packets
    vsensor_ns = result["cpu_ns"][process.pid]
    nats_ns = sum(ns for pid, ns in result["cpu_ns"].items() if pid != process.pid)
    return {"mode": mode, "chunks": len(bodies), "packets_per_chunk": packets,
            "frame_bytes": frame_bytes, "packets": sent,
            "body_bytes": sum(map(len, bodies)), "seconds": round(result["seconds"], 3),
            "packets_per_second": round(sent / result["seconds"]),
            "vsensor_us_per_packet": round(vsensor_ns / 1000 / sent, 3),
            "nats_us_per_packet": round(nats_ns / 1000 / sent, 3) if nats else None,
            "nats_ms_per_mb": (round(nats_ns / 1e6 / (sum(map(len, bodies)) / 1e6), 2)
                               if nats else None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--packets", type=int, default=8192, help="packets per chunk")
    parser.add_argument("--frame-bytes", type=int, default=64, choices=range(42, 1515),
                        metavar="42-1514")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--modes", default="single,cluster")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bodies = chunk_bodies(args.chunks, args.packets, args.frame_bytes)
    results = []
    with tempfile.TemporaryDirectory(prefix="ossensor-ingest-") as tmp:
        for mode in args.modes.split(","):
            row = trial(mode, Path(tmp) / mode, bodies, args.packets, args.frame_bytes,
                        args.in_flight)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
