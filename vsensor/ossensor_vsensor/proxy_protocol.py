"""The PROXY protocol header (versions 1 and 2) a TCP load balancer puts before a connection.

Behind HAProxy in TCP mode every sensor's connection comes from the load balancer's address, so
the per-address caps (``server.py``) would count all sensors as one client, and Antigena would
learn the balancer's address as each sensor's. With ``--proxy-protocol-from CIDR`` the vSensor
expects connections from those addresses to start with a PROXY header (HAProxy:
``send-proxy-v2``) and takes the client's address from it; from any other address a connection
is taken as it is, so nobody else can claim an address.

:func:`parse` reads the header from the first bytes of a connection (TLS has not started: the
header comes before the ClientHello). The header also names the balancer's front end that the
client connected to: the vSensor's filters leave the sensors' traffic to it out too
(``sensor_filters.py``). It is bounded: a version 1 header is at most 107 bytes,
a version 2 header at most :data:`MAX_V2_BYTES` (addresses and up to a few hundred bytes of
TLVs, which are skipped).
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107
#: 16 bytes of fixed header and 216 of addresses (AF_UNIX) plus room for TLVs (HAProxy adds a
#: few: ALPN, authority, unique id); a longer header is not from a load balancer of ours.
MAX_V2_BYTES = 16 + 1024


#: What :func:`parse` found: the header's length, the client's address and the address and port
#: the client connected to (the balancer's front end); both None for a connection the balancer
#: made itself (v2 ``LOCAL``, v1 ``UNKNOWN``: a health check).
Header = tuple[int, "str | None", "tuple[str, int] | None"]


def parse(data: bytes) -> Header | None:
    """The PROXY header at the start of ``data`` (:data:`Header`). None when ``data`` does not
    hold the whole header yet. ValueError when ``data`` does not start with a valid header."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)] and b"\r\n" not in data:
        if len(data) >= V1_MAX_BYTES:
            raise ValueError(f"PROXY v1 header longer than {V1_MAX_BYTES} bytes")
        return None
    if data.startswith(V1_PREFIX):
        return _v1(data)
    raise ValueError("no PROXY protocol header (is the load balancer set to send-proxy-v2?)")


def _v2(data: bytes) -> Header | None:
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ValueError(f"PROXY v2 header of version {version_command >> 4}")
    if 16 + length > MAX_V2_BYTES:
        raise ValueError(f"PROXY v2 header of {16 + length} bytes (at most {MAX_V2_BYTES})")
    if len(data) < 16 + length:
        return None
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection
        return 16 + length, None, None
    if command != 1:
        raise ValueError(f"PROXY v2 command {command} (0 LOCAL or 1 PROXY)")
    body = data[16:16 + length]
    if family >> 4 == 1 and len(body) >= 12:  # AF_INET
        port = struct.unpack_from("!H", body, 10)[0]
        return (16 + length, str(ipaddress.IPv4Address(body[:4])),
                (str(ipaddress.IPv4Address(body[4:8])), port))
    if family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        port = struct.unpack_from("!H", body, 34)[0]
        return (16 + length, str(ipaddress.IPv6Address(body[:16])),
                (str(ipaddress.IPv6Address(body[16:32])), port))
    if family >> 4 == 0:  # AF_UNSPEC
        return 16 + length, None, None
    raise ValueError(f"PROXY v2 address family {family >> 4} with {len(body)} address bytes")


def _v1(data: bytes) -> Header:
    end = data.index(b"\r\n")
    if end + 2 > V1_MAX_BYTES:
        raise ValueError(f"PROXY v1 header longer than {V1_MAX_BYTES} bytes")
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ValueError("PROXY v1 header is not ASCII") from None
    if fields[1:2] == ["UNKNOWN"]:
        return end + 2, None, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"PROXY v1 header {data[:end][:V1_MAX_BYTES]!r} is not "
                         "'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    try:
        source = ipaddress.ip_address(fields[2])
        destination = ipaddress.ip_address(fields[3])
        ports = [int(p) for p in fields[4:]]
    except ValueError:
        raise ValueError(f"PROXY v1 header {data[:end]!r}: bad address or port") from None
    if source.version != (4 if fields[1] == "TCP4" else 6) or not all(0 <= p <= 65535
                                                                    for p in ports):
        raise ValueError(f"PROXY v1 header {data[:end]!r}: bad address or port")
    return end + 2, str(source), (str(destination), ports[1])
