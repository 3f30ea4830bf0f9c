"""What the built-in user-space filters cost per packet, measured on batches in memory.

The filters (``dedup``, ``slice``) are the one place where the sensor must look at every
packet, so their cost is reported beside the capture figures: nanoseconds per packet over 32
batches of 1,024 UDP frames (512 bytes, random payloads, 256 flows), best of three runs, with
the pcapng writer's per-packet loop over the same batches as a yardstick (the work the
``file`` transport and the vSensor do for every packet).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from ossensor_plugins.filter_dedup import Dedup
from ossensor_plugins.filter_slice import Slice

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.wire.pcapng import epb_parts

BATCHES, PER_BATCH, FRAME = 32, 1024, 512


def _frame(n: int, ttl: int) -> bytes:
    payload = os.urandom(FRAME - 42)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), n & 0xFFFF, 0, ttl, 17, 0,
                     socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2"))
    udp = struct.pack("!HHHH", 40000 + n % 256, 7000, 8 + len(payload), 0)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp + payload


def _batches(interface: str, index: int, frames: list[bytes], start_ns: int,
             ttl_shift: int = 0) -> list[PacketBatch]:
    batches = []
    for b in range(BATCHES):
        chunk = frames[b * PER_BATCH:(b + 1) * PER_BATCH]
        if ttl_shift:  # the same packets one hop later: TTL (and MACs) differ
            chunk = [f[:22] + bytes([f[22] - ttl_shift]) + f[23:] for f in chunk]
        batches.append(PacketBatch.from_frames(interface, index, 1, [
            (start_ns + (b * PER_BATCH + i) * 1000, len(f), f) for i, f in enumerate(chunk)]))
    return batches


def _best(run) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def filter_costs() -> list[dict[str, Any]]:
    frames = [_frame(n, 64) for n in range(BATCHES * PER_BATCH)]
    now = time.time_ns()
    pod = _batches("pod0", 10, frames, now)
    bridge = _batches("br0", 11, frames, now + 200_000, ttl_shift=1)  # the same, 0.2 ms later
    mixed = [b for pair in zip(pod, bridge, strict=True) for b in pair]
    packets = sum(b.count for b in mixed)
    results = []
    dropped = 0

    def dedup() -> None:
        nonlocal dropped
        packet_filter = Dedup()
        dropped = sum(b.count - packet_filter.filter(b).count for b in mixed)

    yardstick = _best(lambda: [b"".join(epb_parts(b, 0)) for b in mixed]) / packets
    results.append({"filter": "dedup (every packet seen twice)", "packets": packets,
                    "ns_per_packet": round(_best(dedup) / packets * 1e9), "dropped": dropped})
    for label, make in (("slice bytes=96", lambda: Slice(snap_bytes=96)),
                        ("slice packets=10", lambda: Slice(flow_packets=10))):
        kept = 0

        def run(make=make) -> None:
            nonlocal kept
            packet_filter = make()
            kept = sum(packet_filter.filter(b).count for b in pod)

        cost = _best(run) / (BATCHES * PER_BATCH)
        results.append({"filter": label, "packets": BATCHES * PER_BATCH,
                        "ns_per_packet": round(cost * 1e9), "kept": kept})
    for result in results:
        result["pcapng_writer_ns_per_packet"] = round(yardstick * 1e9)
    return results
