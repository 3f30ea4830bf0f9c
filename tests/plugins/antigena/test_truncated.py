"""Antigena's watch filter never matches a frame it has not read whole (issue 16, item 3), with
the kernel as the judge: in a namespace, the compiled watch filter is attached to a real
AF_PACKET socket on a veth, and every prefix of a blocked TCP segment (cut inside the Ethernet
header, the VLAN tag, the IPv4 or IPv6 header, the TCP header, the payload) is sent through the
other end. Only frames holding the whole TCP header reach the socket, and of those the parser
acts only on the one that holds the whole IP packet."""

from __future__ import annotations

import ipaddress
import json
import struct
import sys

from ossensor_plugins.antigena.actions import Action, watch_filter

SRC4, DST4, SRC6, DST6 = "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"
SPORT, DPORT = 40000, 7100
PAYLOAD = b"OSAG" * 4
ETHERNET = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"

ORACLE = r"""
import json, select, socket, subprocess, sys, time
from ossensor_core.capture.bpf import BpfProgram, attach_filter
from ossensor_plugins.antigena.actions import parse_ethernet
subprocess.run(["ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=True)
for name in ("va", "vb"):
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
request = json.loads(sys.stdin.read())
sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
sender.bind(("va", 0))
receiver = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
receiver.bind(("vb", 0))
attach_filter(receiver.fileno(), BpfProgram("watch", 1, tuple(map(tuple, request["program"]))))
results = {}
for kind, frames in request["frames"].items():
    sent = []
    for frame in map(bytes.fromhex, frames):
        try:
            sender.send(frame)
            sent.append(len(frame))
        except OSError:  # shorter than the link header: the kernel will not even send it
            pass
    received, deadline = [], time.monotonic() + 1.0
    while time.monotonic() < deadline:
        ready, _, _ = select.select([receiver], [], [], 0.2)
        if ready:
            data = receiver.recv(65536)
            received.append([data.hex(), parse_ethernet(data) is not None])
    results[kind] = {"sent": sent, "received": received}
print(json.dumps(results))
"""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(ipv6: bool) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", SPORT, DPORT, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0) + \
        PAYLOAD
    if ipv6:
        return struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + \
            ipaddress.IPv6Address(SRC6).packed + ipaddress.IPv6Address(DST6).packed + tcp
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                         ipaddress.IPv4Address(SRC4).packed, ipaddress.IPv4Address(DST4).packed)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + tcp


def frames() -> dict[str, tuple[bytes, int]]:
    """Each kind: the whole frame and where its TCP header ends, as the filter sees it (the
    receiving kernel takes the VLAN tag off before the filter runs)."""
    v4, v6 = tcp_segment(False), tcp_segment(True)
    return {"ethernet-ipv4": (ETHERNET + b"\x08\x00" + v4, 14 + 20 + 20),
            "vlan-ipv4": (ETHERNET + b"\x81\x00\x00\x64\x08\x00" + v4, 14 + 20 + 20),
            "ethernet-ipv6": (ETHERNET + b"\x86\xdd" + v6, 14 + 40 + 20),
            "vlan-ipv6": (ETHERNET + b"\x81\x00\x00\x64\x86\xdd" + v6, 14 + 40 + 20)}


def test_frames_cut_inside_any_header_never_match_the_watch_filter(netns):
    # Both directions of the blocked connection, by address and port, for both IP versions:
    # the filter reads Ethernet, IP addresses, TCP ports (and the guard, the last header byte).
    actions = [Action("ag-4", ipaddress.ip_network(SRC4), ipaddress.ip_network(DST4), None,
                      DPORT, 0.0, 1e10),
               Action("ag-6", ipaddress.ip_network(SRC6), ipaddress.ip_network(DST6), None,
                      DPORT, 0.0, 1e10)]
    from ossensor_core.capture.bpf import compile_filter
    program = compile_filter(watch_filter(actions, [("198.51.100.9", 8443)]))
    kinds = frames()
    request = {"program": program.instructions,
               "frames": {kind: [frame[:n].hex() for n in range(1, len(frame) + 1)]
                          for kind, (frame, _) in kinds.items()}}
    done = netns.exec(sys.executable, "-c", ORACLE, input=json.dumps(request))
    results = json.loads(done.stdout)
    for kind, (frame, header_end) in kinds.items():
        tag = 4 if kind.startswith("vlan") else 0
        received = results[kind]["received"]
        lengths = sorted(len(bytes.fromhex(data)) for data, _ in received)
        # Every cut from the end of the TCP header on passes, every shorter one is never seen.
        assert lengths == list(range(header_end, len(frame) - tag + 1)), (kind, lengths)
        # Only the whole frame is acted on: a cut inside the payload is not the packet whose
        # length the IP header states.
        acted = [len(bytes.fromhex(data)) for data, parsed in received if parsed]
        assert acted == [len(frame) - tag], (kind, acted)
        assert len(results[kind]["sent"]) >= len(frame) - 14  # the cuts were really sent
