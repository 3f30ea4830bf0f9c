"""Writing pcapng: one section, an interface block per captured interface, nanosecond stamps.

Files hold one link type each: tcpdump 4.99 refuses a file whose interfaces mix link types.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from ossensor_core import __version__
from ossensor_core.capture.batch import (TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID,
                                         TPACKET3_HDR, PacketBatch)
from ossensor_core.capture.headers import ETH_P_8021Q
from ossensor_core.wire.names import LINKTYPE_ETHERNET, SNAPLEN

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END = 0
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_TSRESOL = 9


def _option(code: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header() -> bytes:
    options = _option(_SHB_USERAPPL, f"ossensor {__version__}".encode()) + _option(_OPT_END, b"")
    return _block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options)


def interface_description(name: str, linktype: int) -> bytes:
    options = (_option(_IF_NAME, name.encode()) + _option(_IF_TSRESOL, bytes([9]))
               + _option(_OPT_END, b""))
    return _block(_IDB, struct.pack("<HHI", linktype, 0, SNAPLEN) + options)


_EPB_HEAD = struct.Struct("<IIIIIII")
# The end of an EPB: zero padding to 4 bytes, then the block length again; one Struct per pad.
_EPB_TAIL = [struct.Struct(f"<{pad}xI").pack for pad in range(4)]


def epb_parts(batch: PacketBatch, interface_id: int) -> list[bytes | memoryview]:
    """The Enhanced Packet Blocks of ``batch``, as parts for one ``b"".join``.

    This is the vSensor's per-packet loop (and the ``file`` transport's), so it is kept tight:
    the record header read once, the frame referenced by a memoryview and copied only by the
    join. A VLAN tag the kernel stripped is put back as libpcap does (see
    :meth:`PacketBatch.packets`).
    """
    data = batch.data
    view = memoryview(data)
    unpack = TPACKET3_HDR.unpack_from
    head = _EPB_HEAD.pack
    tails = _EPB_TAIL
    ethernet = batch.linktype == LINKTYPE_ETHERNET
    parts: list[bytes | memoryview] = []
    append = parts.append
    offsets = batch.offsets() if batch.sliced else None
    offset = 0
    for index in range(batch.count):
        if offsets is not None:
            offset = offsets[index]
        step, sec, nsec, snaplen, length, status, mac, _, _, tci, tpid, _ = unpack(data, offset)
        start = offset + mac
        frame: bytes | memoryview = view[start:start + snaplen]
        if ethernet and status & TP_STATUS_VLAN_VALID and snaplen >= 12:
            tag_type = tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else ETH_P_8021Q
            frame = bytes(frame[:12]) + struct.pack("!HH", tag_type, tci) + bytes(frame[12:])
            snaplen += 4
            length += 4
            if snaplen > SNAPLEN:  # as libpcap: never past the snap length (tshark refuses it)
                frame, snaplen = frame[:SNAPLEN], SNAPLEN
        pad = -snaplen & 3
        total = 32 + snaplen + pad
        ts = sec * 1_000_000_000 + nsec
        append(head(_EPB, total, interface_id, ts >> 32, ts & 0xFFFFFFFF, snaplen, length))
        append(frame)
        append(tails[pad](total))
        offset += step
    return parts


class PcapngWriter:
    """Appends batches of one link type to an open binary file as pcapng."""

    def __init__(self, out: BinaryIO, linktype: int) -> None:
        self.out = out
        self.linktype = linktype
        self.interfaces: dict[str, int] = {}
        self.packets = 0
        self.bytes_written = 0
        self._write(section_header())

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.bytes_written += len(data)

    def write_batch(self, batch: PacketBatch) -> int:
        """Write every packet of ``batch``; returns the number written."""
        if batch.linktype != self.linktype:
            raise ValueError(f"batch of link type {batch.linktype} in a file of {self.linktype}")
        interface_id = self.interfaces.get(batch.interface)
        if interface_id is None:
            interface_id = self.interfaces[batch.interface] = len(self.interfaces)
            self._write(interface_description(batch.interface, batch.linktype))
        parts = epb_parts(batch, interface_id)
        self._write(b"".join(parts))
        self.packets += batch.count
        return batch.count
