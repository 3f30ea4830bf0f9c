"""The segments Antigena crafts, checked against scapy (a test-only dependency) as the reference
builder and decoder; the kernel's acceptance of them is tested end to end in
tests/e2e/test_antigena.py."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ossensor_plugins.antigena.actions import parse_ethernet
from ossensor_plugins.antigena.craft import checksum, ether_frame, tcp_segment

ports = st.integers(1, 65535)
numbers = st.integers(0, 0xFFFFFFFF)
flags = st.sampled_from([0x04, 0x14, 0x10])
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


def _reference(src: str, dst: str, sport: int, dport: int, flag: int, seq: int,
               ack: int) -> bytes:
    ip = IPv6(src=src, dst=dst, hlim=64) if ":" in src else IP(src=src, dst=dst, ttl=64, id=0)
    return bytes(ip / TCP(sport=sport, dport=dport, flags=flag, seq=seq, ack=ack, window=0))


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, flags, numbers,
       numbers)
def test_segments_equal_scapys_byte_for_byte(ends, sport, dport, flag, seq, ack):
    src, dst = ends
    assert tcp_segment(src, dst, sport, dport, flag, seq, ack) == \
        _reference(src, dst, sport, dport, flag, seq, ack)


def test_checksums_verify_and_the_frame_parses_back():
    packet = tcp_segment("192.0.2.1", "198.51.100.7", 40000, 443, 0x14, 123456, 654321)
    assert checksum(packet[:20]) == 0  # a correct IPv4 header sums to zero
    frame = ether_frame(bytes.fromhex("020000000001"), bytes.fromhex("020000000002"), packet)
    decoded = Ether(frame)
    assert decoded[TCP].flags == "RA" and decoded[TCP].seq == 123456
    segment = parse_ethernet(frame)
    assert segment is not None
    assert (segment.sport, segment.dport, segment.seq, segment.ack) == (40000, 443, 123456, 654321)


def test_crafting_imports_no_packet_library():
    """The point of crafting by hand: the sensor does not carry scapy's 30 MiB for it."""
    code = ("import sys, ossensor_plugins.antigena.service, ossensor_plugins.antigena.resets; "
            "print(any(m == 'scapy' or m.startswith('scapy.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_addresses_of_two_families_are_refused():
    try:
        tcp_segment("192.0.2.1", "2001:db8::1", 1, 2, 0x04, 0, 0)
    except ValueError as exc:
        assert "two families" in str(exc)
    else:
        raise AssertionError("mixed families accepted")
