"""TCP segments (IPv4 or IPv6, optionally in an Ethernet frame) built with ``struct``.

Antigena sends only bare TCP headers (resets and probes: no options, no payload), so crafting
them takes a header layout and the Internet checksum, not a packet library: importing the scapy
layers that did this cost about 30 MiB of the sensor's memory and 0.3 s. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import struct

from .actions import ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP

_TCP = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, offset, flags, window, checksum, urgent
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_ETHER = struct.Struct("!6s6sH")
TCP_HEADER = _TCP.size  # 20: no options
DEFAULT_TTL = 64


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: str, dst: str, sport: int, dport: int, flags: int, seq: int, ack: int,
                window: int = 0, ttl: int = DEFAULT_TTL) -> bytes:
    """An IP packet holding a TCP header with ``flags`` (``TCP_*`` of ``actions``), checksums
    filled in; IPv4 or IPv6 after the addresses."""
    source, target = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if source.version != target.version:
        raise ValueError(f"addresses of two families: {src} -> {dst}")
    header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (TCP_HEADER // 4) << 4,
                       flags, window, 0, 0)
    if source.version == 4:
        pseudo = struct.pack("!4s4sBBH", source.packed, target.packed, 0, IPPROTO_TCP,
                             TCP_HEADER)
    else:
        pseudo = struct.pack("!16s16sIxxxB", source.packed, target.packed, TCP_HEADER,
                             IPPROTO_TCP)
    tcp_sum = checksum(pseudo + header)
    header = header[:16] + struct.pack("!H", tcp_sum) + header[18:]
    if source.version == 4:
        ip = _IPV4.pack(0x45, 0, _IPV4.size + TCP_HEADER, 0, 0, ttl, IPPROTO_TCP, 0,
                        source.packed, target.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    else:
        ip = _IPV6.pack(6 << 28, TCP_HEADER, IPPROTO_TCP, ttl, source.packed, target.packed)
    return ip + header


def ether_frame(dst_mac: bytes, src_mac: bytes, packet: bytes) -> bytes:
    """``packet`` (IPv4 or IPv6, after its first nibble) in an Ethernet II frame."""
    ethertype = ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP
    return _ETHER.pack(dst_mac, src_mac, ethertype) + packet
