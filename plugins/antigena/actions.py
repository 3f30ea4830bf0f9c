"""Antigena actions on the sensor: parsing what the vSensor sends, matching TCP segments, and the
kernel filter that lets only blocked traffic reach the watching socket. Pure: no I/O."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ossensor_core.plugin import ETH_P_IP, ETH_P_IPV6, LINKTYPE_ETHERNET, network_header
from ossensor_core.wire.antigena import BlockAction

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
IPPROTO_TCP = 6


@dataclass(frozen=True)
class Action(BlockAction):
    """A block action as the sensor enforces it: matching segments and the kernel filter."""

    def matches(self, segment: Segment) -> bool:
        """The segment belongs to a blocked connection, whichever end sent it."""
        return self.matches_ends(segment.src, segment.sport, segment.dst, segment.dport)

    def bpf(self) -> str:
        """The same match as :meth:`matches`, as a libpcap expression."""
        forward = [f"src net {self.src}" if self.src else "",
                   f"dst net {self.dst}" if self.dst else "",
                   f"src port {self.sport}" if self.sport else "",
                   f"dst port {self.dport}" if self.dport else ""]
        reverse = [f"dst net {self.src}" if self.src else "",
                   f"src net {self.dst}" if self.dst else "",
                   f"dst port {self.sport}" if self.sport else "",
                   f"src port {self.dport}" if self.dport else ""]
        return (f"({' and '.join(p for p in forward if p)}) or "
                f"({' and '.join(p for p in reverse if p)})")


def parse_action(message: object, now: float) -> Action:
    """An action as the vSensor sends it (``docs/antigena.md``); ValueError says what is wrong.
    The same bounds as the vSensor's, with an hour's slack for the two clocks."""
    action = Action.from_json(message, now)
    assert isinstance(action, Action)
    return action


#: Read last by the watch filter: the last byte of the fixed TCP header. A classic BPF load past
#: the end of a packet rejects it, so a frame cut anywhere before it (Ethernet, VLAN, IP or TCP
#: header) never reaches the watch socket (``tests/plugins/antigena/test_truncated.py``).
#: libpcap's ``tcp[]`` is IPv4 only; over IPv6 the TCP header follows the fixed 40 bytes (the
#: parser follows no extension header either).
WHOLE_TCP_HEADER = "((ip and tcp[19] >= 0) or (ip6 and ip6[59] >= 0))"


def watch_filter(actions: Iterable[Action], exempt: Iterable[tuple[str, int]]) -> str:
    """Only whole TCP headers of blocked connections, never the sensor's own vSensor traffic."""
    matches = " or ".join(f"({a.bpf()})" for a in actions)
    if not matches:
        return ""
    spared = "".join(f" and not (host {host} and tcp port {port})"
                     for host, port in sorted(set(exempt)))
    return f"tcp and {WHOLE_TCP_HEADER} and ({matches}){spared}"


@dataclass(frozen=True, slots=True)
class Segment:
    """The fields of one TCP segment that enforcement needs."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: int  # bytes of TCP payload
    eth_src: bytes
    eth_dst: bytes

    @property
    def next_seq(self) -> int:
        """The sequence number the receiver expects after this segment."""
        return (self.seq + self.payload + (1 if self.flags & TCP_SYN else 0)
                + (1 if self.flags & TCP_FIN else 0)) & 0xFFFFFFFF

    def endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return (str(self.src), self.sport), (str(self.dst), self.dport)

    def connection(self) -> tuple:
        """The same key for both directions of a connection."""
        a, b = self.endpoints()
        return (a, b) if a <= b else (b, a)


_TCP = struct.Struct("!HHIIBB")


def parse_ethernet(frame: bytes) -> Segment | None:
    """The TCP segment in an Ethernet frame (VLAN tags skipped), or None."""
    if len(frame) < 14:
        return None
    ethertype, offset = network_header(frame, 0, len(frame), LINKTYPE_ETHERNET)
    if ethertype == ETH_P_IP and len(frame) >= offset + 20:
        ihl = (frame[offset] & 0x0F) * 4
        if frame[offset + 9] != IPPROTO_TCP or ihl < 20:
            return None
        total = int.from_bytes(frame[offset + 2:offset + 4], "big")
        if offset + total > len(frame):  # cut short: never acted on
            return None
        src = ipaddress.IPv4Address(frame[offset + 12:offset + 16])
        dst = ipaddress.IPv4Address(frame[offset + 16:offset + 20])
        tcp, tcp_bytes = offset + ihl, total - ihl
    elif ethertype == ETH_P_IPV6 and len(frame) >= offset + 40:
        if frame[offset + 6] != IPPROTO_TCP:  # extension headers are not followed
            return None
        src = ipaddress.IPv6Address(frame[offset + 8:offset + 24])
        dst = ipaddress.IPv6Address(frame[offset + 24:offset + 40])
        tcp, tcp_bytes = offset + 40, int.from_bytes(frame[offset + 4:offset + 6], "big")
        if tcp + tcp_bytes > len(frame):  # cut short: never acted on
            return None
    else:
        return None
    if len(frame) < tcp + 20:
        return None
    sport, dport, seq, ack, data_offset, flags = _TCP.unpack_from(frame, tcp)
    payload = tcp_bytes - (data_offset >> 4) * 4
    if payload < 0:
        return None
    return Segment(src, dst, sport, dport, seq, ack, flags, payload, frame[6:12], frame[0:6])


def first_match(actions: Sequence[Action], segment: Segment, now: float) -> Action | None:
    for action in actions:
        if now < action.expiry and action.matches(segment):
            return action
    return None


def parse_proc_tcp(text: str, version: int) -> list[tuple[IPAddress, int, IPAddress, int]]:
    """Established connections in ``/proc/net/tcp`` (``version`` 4) or ``tcp6`` (6):
    ``(local address, port, remote address, port)``. Addresses there are hex, 32-bit words in
    host (little-endian) order."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "01":  # TCP_ESTABLISHED
            continue
        ends = []
        for field in fields[1:3]:
            address, _, port = field.partition(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.IPv4Address(raw) if version == 4 else ipaddress.IPv6Address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            ends.append((ip, int(port, 16)))
        found.append((ends[0][0], ends[0][1], ends[1][0], ends[1][1]))
    return found
