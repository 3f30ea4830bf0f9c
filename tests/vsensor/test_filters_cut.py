"""Filters keep what they cannot read: frames cut inside a header, judged by the kernel.

The vSensor's filter (its own uploads, ``not (host V and tcp port P)``) and the peer exclusion
only drop a frame whose headers they have read whole. A frame cut anywhere before the last byte
they read (the link header, the inner VLAN tag, the IP header with both addresses, the TCP ports)
is kept; the whole frame, and the frame cut just after those bytes, are decided as before.
Malformed IP headers (wrong version for the EtherType, an IPv4 header length under 20) are kept
by the peer exclusion.

What the kernel cannot be shown: an Ethernet frame under 14 bytes (``AF_PACKET`` refuses to send
it) and a frame cut inside its outer VLAN tag or the two bytes after it (the receiving kernel drops it
before any socket sees it). The 802.1Q tag the kernel takes off is invisible to filters; QinQ leaves the inner tag
in the data, where the exclusion reads it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from ossensor_core.capture.bounded import bounded_code, fit_bounded
from ossensor_core.capture.bpf import LINKTYPE_ETHERNET, LINKTYPE_RAW, BpfProgram, compile_filter
from ossensor_core.errors import FilterError
from ossensor_core.capture.peer_exclusion import AddressSet, with_exclusion
from ossensor_core.pipeline.sensor import Sensor
from ossensor_vsensor.filters import self_expression
from tests.helpers.bpf_oracle import Kernel, kernel_oracle
from tests.helpers.traffic import ipv4_packet, udp4_packet, udp6_packet

PEERS = AddressSet.parse(["198.51.100.0/25", "2001:db8:5::/48"])
VSENSOR4, VSENSOR6, PORT = "192.0.2.1", "2001:db8:f::1", 443
ETH = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    yield from kernel_oracle()


def tcp_header(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 512, 0, 0)


def tcp6_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    return struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, s, d) + tcp_header(sport, dport)


# (name, IP packet, bytes of it the filters read, dropped when whole and untagged). The uploads
# go to the vSensor's port: libpcap reads the source port first, then the destination port (a
# frame cut after a source port 443 is decided on that, having read what it reads).
PACKETS = [
    ("self v4", ipv4_packet("203.0.113.9", VSENSOR4, 6, tcp_header(40000, PORT), 1), 24, True),
    ("self v6", tcp6_packet("2001:db8:9::2", VSENSOR6, 40001, PORT), 44, True),
    ("peer v4", udp4_packet("198.51.100.7", "203.0.113.9", 40000, 7000, b"x" * 30, 2), 20, True),
    ("peer v6", udp6_packet("2001:db8:5::7", "2001:db8:9::1", 40000, 7000, b"y" * 30), 40, True),
    ("other v4", udp4_packet("203.0.113.1", "203.0.113.2", 40000, 7000, b"z" * 30, 3), 20, False),
]


def sensor_program(linktype: int, user: str = "") -> BpfProgram:
    """What the sensor attaches: its own composition (``Sensor.program``), no copy of it."""
    sensor = Sensor.__new__(Sensor)  # only the filter state: no captures, no plugins
    sensor.prepared = SimpleNamespace(kernel_filter=user)
    sensor.captures, sensor.vsensor_filter, sensor.vsensor_peers = {}, "", None
    sensor.filter_notes = {}
    both = (f"{self_expression(VSENSOR4, [PORT])} and "
            f"{self_expression(VSENSOR6, [PORT])}")
    assert sensor.set_vsensor_filter(both, PEERS) == ""
    return sensor.program(linktype)


def old_program(linktype: int) -> BpfProgram:
    """The composition before: one libpcap program for the vSensor's part and the user's."""
    both = f"{self_expression(VSENSOR4, [PORT])} and {self_expression(VSENSOR6, [PORT])}"
    return with_exclusion(PEERS, compile_filter(both, linktype))


def cases(link: str) -> list[tuple[bytes, bytes, bool, str]]:
    """(frame sent, frame the socket sees, kept?, what) for every packet and cut."""
    out = []
    for name, packet, reads, dropped in PACKETS:
        if link == "raw":
            head, tail = b"", packet
        else:
            ethertype = b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00"
            tags = {"eth": b"", "802.1q": b"\x81\x00\x00\x64",
                    "qinq": b"\x88\xa8\x00\x64\x81\x00\x00\x65"}[link]
            head = ETH + tags + ethertype
            tail = packet
        # A tagged frame in the data (QinQ's inner tag) is not the vSensor's own traffic for
        # libpcap's ``host`` (no ``vlan`` in the expression): only the peer rule drops it.
        whole_dropped = dropped and (link != "qinq" or name.startswith("peer"))
        # The kernel takes a VLAN tag off only when the two bytes after it are there too.
        first = {"raw": 1, "eth": 14, "802.1q": 20, "qinq": 20}[link]
        for length in range(first, len(head) + reads):
            sent = (head + tail)[:length]
            seen = sent[:12] + sent[16:] if link in ("802.1q", "qinq") else sent
            out.append((sent, seen, True, f"{name} cut at {length}"))
        for length in (len(head) + reads, len(head) + len(tail)):
            sent = (head + tail)[:length]
            seen = sent[:12] + sent[16:] if link in ("802.1q", "qinq") else sent
            out.append((sent, seen, not whole_dropped, f"{name} {length} bytes (whole)"))
    # Malformed IP headers: an IPv4 header length of 16, a version 6 in an IPv4 EtherType (and
    # on raw links version 4 with the IPv6 packet's length), kept by the peer exclusion.
    v4, v6 = PACKETS[2][1], PACKETS[3][1]
    bad = [b"\x44" + v4[1:]] + ([] if link == "raw" else [b"\x65" + v4[1:], b"\x46" + v6[1:]])
    for packet in bad:
        if link == "raw":
            out.append((packet, packet, True, f"malformed {packet[:1].hex()}"))
        elif link == "eth":
            ethertype = b"\x08\x00" if packet[:1] != b"\x46" else b"\x86\xdd"
            out.append((ETH + ethertype + packet, ETH + ethertype + packet, True,
                        f"malformed {packet[:1].hex()}"))
    return out


@pytest.mark.parametrize("link", ["eth", "802.1q", "qinq", "raw"])
def test_cut_frames_are_kept_and_whole_ones_decided_as_before(kernel, link):
    linktype = LINKTYPE_RAW if link == "raw" else LINKTYPE_ETHERNET
    frames = cases(link)
    expected: dict[bytes, bool] = {}
    for _sent, seen, kept, what in frames:
        assert expected.setdefault(seen, kept) == kept, what  # the same bytes, the same fate
    sent = list(dict.fromkeys(f[0] for f in frames))
    received = kernel.frames(sensor_program(linktype), sent) & set(expected)
    wrong = [what for _, seen, kept, what in frames if (seen in received) != kept]
    assert not wrong, wrong
    # Whole frames: the same decisions as the composition before (one libpcap program).
    wholes = [f for f in frames if "whole" in f[3]]
    marker = PACKETS[4][1][:-1] if link == "raw" else b""  # kept by both, whole or not
    before = kernel.frames(old_program(linktype), [f[0] for f in wholes], marker)
    before &= set(expected)
    assert {f[1] for f in wholes if f[1] in before} == {f[1] for f in wholes if f[2]}


def test_the_user_program_still_decides_what_the_filters_keep(kernel):
    """A cut frame passes the vSensor's part and the exclusion; the user's BPF may drop it."""
    cut = (ETH + b"\x08\x00" + PACKETS[0][1])[:33]  # the 33-byte frame of the issue
    assert kernel.frames(sensor_program(LINKTYPE_ETHERNET), [cut]) == {cut}
    whole = ETH + b"\x08\x00" + PACKETS[4][1]  # kept by all: the end marker (not reported)
    assert kernel.frames(sensor_program(LINKTYPE_ETHERNET, "len >= 34"), [cut],
                         whole) == set()
    assert kernel.frames(old_program(LINKTYPE_ETHERNET), [cut], whole) == set()  # the bug


def test_a_long_vsensor_filter_falls_back_to_one_program_with_a_note(caplog):
    """Rewritten jumps that no longer reach (a third-party vSensor's long expression): the
    filter is applied as before, without the checks, and the sensor says so."""
    hosts = " or ".join(f"host 10.0.{i // 250}.{i % 250}" for i in range(200))
    program, note = fit_bounded(f"not ({hosts})", "not port 53", LINKTYPE_ETHERNET)
    assert program == compile_filter(f"(not ({hosts})) and (not port 53)", LINKTYPE_ETHERNET)
    assert note.startswith("the vSensor's filter is applied without bounds checks")
    assert "out of range" in note
    short, none = fit_bounded(self_expression(VSENSOR4, [PORT]), "", LINKTYPE_ETHERNET)
    assert none == "" and short.expression.startswith("(bounded: ")


def test_programs_using_the_scratch_slot_of_the_checks_are_refused():
    program = BpfProgram("uses M[15]", LINKTYPE_ETHERNET,
                         ((0x80, 0, 0, 0), (0x02, 0, 0, 15), (0x06, 0, 0, 0)))
    with pytest.raises(FilterError, match="scratch slot 15"):
        bounded_code(program)
    # Accepts become jumps past the part; ret #0 stays; loads get their checks.
    code = bounded_code(compile_filter("ip", LINKTYPE_ETHERNET))
    assert (0x06, 0, 0, 0) in code and not any(c == 0x06 and k for c, _, _, k in code)
    assert code[:3] == [(0x80, 0, 0, 0), (0x35, 1, 0, 14), (0x05, 0, 0, len(code) - 3)]
