"""The batch: packets from one interface, in the record layout of the kernel's TPACKET_V3 ring.

A :class:`PacketBatch` is what flows from a capture source through the filters to the encoder. Its
``data`` is a run of records laid out exactly like the packets of a TPACKET_V3 ring block: each
record starts with a ``struct tpacket3_hdr`` (48 bytes: next-record offset, seconds, nanoseconds,
captured length, wire length, status, offset of the frame, VLAN tag), and the frame follows at
``tp_mac``. The ``afpacket`` backend therefore hands over the used bytes of a ring block with one
copy and no per-packet work; other backends build the same layout with :meth:`from_frames`.

Slicing is cheap: a sub-batch shares ``data`` and keeps a list of record offsets. Per-packet views
(:meth:`packets`, :meth:`frames`) walk the headers and are for the stages that need them (user-space
filters, pcapng writing); nothing on the capture path calls them.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ossensor_core.capture.headers import ETH_P_8021Q
from ossensor_core.wire.names import LINKTYPE_ETHERNET

TPACKET3_HDR = struct.Struct("<IIIIIIHHIIHH8x")  # struct tpacket3_hdr, 48 bytes
TPACKET_ALIGNMENT = 16
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6


def _align(n: int) -> int:
    return (n + TPACKET_ALIGNMENT - 1) & ~(TPACKET_ALIGNMENT - 1)


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet, as written to a capture file: VLAN tag restored, nanosecond timestamp."""

    timestamp_ns: int
    wire_length: int
    data: bytes


class PacketBatch:
    """Packets captured on one interface, in TPACKET_V3 record layout; cheap to slice."""

    __slots__ = ("interface", "ifindex", "linktype", "data", "count", "_offsets")

    def __init__(self, interface: str, ifindex: int, linktype: int, data: bytes | memoryview,
                 count: int, offsets: Sequence[int] | None = None) -> None:
        self.interface = interface
        self.ifindex = ifindex
        self.linktype = linktype
        self.data = data
        self.count = count
        self._offsets: array | None = array("I", offsets) if offsets is not None else None

    @classmethod
    def from_frames(cls, interface: str, ifindex: int, linktype: int,
                    frames: Iterable[tuple[int, int, bytes]]) -> PacketBatch:
        """Build a batch from ``(timestamp_ns, wire_length, frame)`` tuples.

        The frames are stored as captured; a VLAN tag, if any, is already inside the frame.
        """
        parts: list[bytes] = []
        count = 0
        hdr_len = TPACKET3_HDR.size
        pack = TPACKET3_HDR.pack
        for timestamp_ns, wire_length, frame in frames:
            size = _align(hdr_len + len(frame))
            seconds, nanoseconds = divmod(timestamp_ns, 1_000_000_000)
            parts.append(pack(size, seconds, nanoseconds, len(frame), wire_length, 0, hdr_len,
                              hdr_len, 0, 0, 0, 0))
            parts.append(frame)
            parts.append(b"\0" * (size - hdr_len - len(frame)))
            count += 1
        return cls(interface, ifindex, linktype, b"".join(parts), count)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"PacketBatch({self.interface!r}, linktype={self.linktype}, "
                f"packets={self.count}, bytes={len(self.data)})")

    @property
    def sliced(self) -> bool:
        """True for a sub-batch (chosen records); False when ``data`` holds exactly the
        ``count`` records, chained by their next-record offsets."""
        return self._offsets is not None

    def offsets(self) -> array:
        """Offsets of the records in ``data`` (walks the record chain once, then cached)."""
        if self._offsets is None:
            offsets = array("I")
            position = 0
            unpack = TPACKET3_HDR.unpack_from
            for _ in range(self.count):
                offsets.append(position)
                position += unpack(self.data, position)[0]
            self._offsets = offsets
        return self._offsets

    def __getitem__(self, index: slice) -> PacketBatch:
        if not isinstance(index, slice):
            raise TypeError("index a PacketBatch with a slice, or use packets()")
        chosen = self.offsets()[index]
        return PacketBatch(self.interface, self.ifindex, self.linktype, self.data, len(chosen),
                           chosen)

    def select(self, indexes: Iterable[int]) -> PacketBatch:
        """The packets at ``indexes`` (in that order), sharing this batch's data."""
        offsets = self.offsets()
        chosen = array("I", (offsets[i] for i in indexes))
        return PacketBatch(self.interface, self.ifindex, self.linktype, self.data, len(chosen),
                           chosen)

    def headers(self) -> Iterator[tuple[int, ...]]:
        """Yield each record's ``(offset, sec, nsec, snaplen, len, status, mac, vlan_tci, tpid)``."""
        unpack = TPACKET3_HDR.unpack_from
        data = self.data
        for offset in self.offsets():
            (_, sec, nsec, snaplen, length, status, mac, _, _, tci, tpid, _) = unpack(data, offset)
            yield offset, sec, nsec, snaplen, length, status, mac, tci, tpid

    def packets(self) -> Iterator[Packet]:
        """Each packet as it goes into a capture file.

        The kernel strips the 802.1Q tag of a VLAN frame and reports it in the header; like
        libpcap we put it back after the two MAC addresses, and count it in both lengths.
        """
        data = self.data
        ethernet = self.linktype == LINKTYPE_ETHERNET
        for offset, sec, nsec, snaplen, length, status, mac, tci, tpid in self.headers():
            start = offset + mac
            frame = bytes(data[start:start + snaplen])
            if ethernet and status & TP_STATUS_VLAN_VALID and len(frame) >= 12:
                tag_type = tpid if status & TP_STATUS_VLAN_TPID_VALID and tpid else ETH_P_8021Q
                frame = frame[:12] + struct.pack("!HH", tag_type, tci) + frame[12:]
                length += 4
            yield Packet(sec * 1_000_000_000 + nsec, length, frame)

    def compact(self) -> bytes:
        """The records of this batch alone, contiguous, for encoding.

        A whole batch is returned as it is; a sub-batch is copied record by record with the
        next-record offsets rewritten so that the chain walks again.
        """
        if self._offsets is None:
            return bytes(self.data)
        out = bytearray()
        data = self.data
        for offset in self._offsets:
            header = TPACKET3_HDR.unpack_from(data, offset)
            # The last record of a kernel block has no next offset: its size is mac + snaplen.
            size = header[0] or _align(header[6] + header[3])
            record = bytearray(data[offset:offset + size])
            struct.pack_into("<I", record, 0, len(record))
            out += record
        return bytes(out)

    def byte_count(self) -> int:
        """Bytes on the wire of the packets in this batch (walks the headers)."""
        return sum(h[4] for h in self.headers())
