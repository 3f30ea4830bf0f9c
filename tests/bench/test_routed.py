"""The routed trial's datagrams and how what was stored is counted per number."""

from __future__ import annotations

import struct

from bench.routed import ROUTED_PORT, numbered_pcap
from bench.soak_report import count_numbered_frames
from bench.testbed import pcap_frames


def write_pcap(path, frames) -> None:
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for frame in frames:
            out.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + bytes(frame))


def numbered_frames(tmp_path, size: int, count: int) -> list[bytes]:
    """The routed trial's ``count`` datagrams of ``size`` bytes, node B to node A's pod."""
    path = tmp_path / "routed.pcap"
    numbered_pcap(path, size, count, "02:00:00:00:00:0b", "02:00:00:00:00:0a",
                  "198.51.100.18", "198.51.100.34", ROUTED_PORT)
    return [bytes(f) for f in pcap_frames(path)]


def test_numbered_frames_are_valid_ipv4_udp_with_random_payloads(tmp_path):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    frames = numbered_frames(tmp_path, 64, 250_001)
    assert len(frames) == 250_001 and {len(f) for f in frames} == {64}
    last = Ether(frames[-1])
    assert last.dst == "02:00:00:00:00:0a" and last.src == "02:00:00:00:00:0b"
    assert (last[IP].src, last[IP].dst, last[UDP].dport) == ("198.51.100.18", "198.51.100.34",
                                                            ROUTED_PORT)
    checksum = last[IP].chksum
    del last[IP].chksum
    assert IP(bytes(last[IP]))[IP].chksum == checksum  # scapy recomputes the same
    assert last[UDP].len == 64 - 34 and bytes(last[UDP].payload)[:8] == \
        b"OSSQ" + (250_000).to_bytes(4, "big")
    assert frames[1][50:] != frames[2][50:]  # random after the number: nothing compresses


def test_missing_and_twice_stored_numbers_are_counted(tmp_path):
    frames = numbered_frames(tmp_path, 512, 100)
    assert len(frames) == 100 and {len(f) for f in frames} == {512}
    stored = frames[:3] + frames[4:] + [frames[7], frames[7], frames[9]]  # 3 lost, 7 and 9 again
    stored.append(frames[5][:40])  # a frame cut short is no datagram of ours
    write_pcap(tmp_path / "stored.pcap", stored)
    found = count_numbered_frames(pcap_frames(tmp_path / "stored.pcap"), ROUTED_PORT, 100)
    assert found == {"stored_once": 97, "missing": 1, "stored_twice_or_more": 2,
                     "first_missing": 3, "unexpected_numbers": 0}
    # Another port's datagrams do not count.
    assert count_numbered_frames(iter(frames), ROUTED_PORT + 1, 100)["missing"] == 100
