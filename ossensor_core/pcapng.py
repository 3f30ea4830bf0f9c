"""Writing pcapng: one section, an interface block per captured interface, nanosecond stamps.

Files hold one link type each: tcpdump 4.99 refuses a file whose interfaces mix link types.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from . import __version__
from .batch import PacketBatch

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END = 0
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_TSRESOL = 9
SNAPLEN = 262144


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
        head = struct.Struct("<IIIIIII").pack
        parts = []
        for packet in batch.packets():
            caplen = len(packet.data)
            pad = (-caplen) % 4
            total = 32 + caplen + pad
            ts = packet.timestamp_ns
            parts.append(head(_EPB, total, interface_id, ts >> 32, ts & 0xFFFFFFFF, caplen,
                              packet.wire_length))
            parts.append(packet.data)
            parts.append(b"\0" * pad + struct.pack("<I", total))
        self._write(b"".join(parts))
        self.packets += batch.count
        return batch.count
