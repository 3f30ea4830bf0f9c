"""The ``dedup`` filter: a frame seen on two interfaces of the same node is stored once.

Capturing every interface of a node sees a pod's traffic twice or more: on the pod's veth and
again on the bridge or the uplink. Within a short window (``OSSENSOR_DEDUP_WINDOW_MS``, 50 ms),
a packet whose bytes were already seen on *another* interface is dropped; the same bytes twice
on one interface (a retransmission) are kept. Fields that change in flight are left out of the
hash: the link-layer header (MAC addresses differ after routing, and a VLAN tag may be stripped
on one port only), the IPv4 TTL and header checksum, the IPv6 hop limit. The IP header with its
identification and length, the transport header with its checksum and the start of the payload
identify a packet; ``OSSENSOR_DEDUP_HASH_BYTES`` bounds how much is hashed (CRC-32 of the
pieces, keyed with the layer-3 length, the EtherType and the IP protocol).

Timestamps are the packets' own, so the order in which the interfaces' batches reach the filter
does not matter; an entry is kept a little longer than the window (``HOLD_NS``) because one
interface's batch can arrive a ring block timeout after another's. ``dropped`` counts what was
dropped (reported at debug level 1 with every batch that lost packets).

Settings (``OSSENSOR_DEDUP_*``): ``window_ms``, ``hash_bytes``, ``max_entries``.
"""

from __future__ import annotations

import logging
import struct
from array import array
from zlib import crc32

from ossensor_core.runtime.logsetup import level
from ossensor_core.plugin import (ETH_P_IP, ETH_P_IPV6, LINKTYPE_ETHERNET, PacketBatch, SensorConfig, Setting,
                                  SettingsGroup, hookimpl, network_header)

log = logging.getLogger(__name__)

#: The first seven fields of ``struct tpacket3_hdr``: next offset, sec, nsec, snaplen, len,
#: status, mac offset (see ``ossensor_core.capture.batch``).
_RECORD = struct.Struct("<IIIIIIH")
#: How long past the window an entry is kept: batches of two interfaces reach the filter up to
#: a ring block timeout apart (afpacket's default is 100 ms), more on a busy node.
HOLD_NS = 1_000_000_000


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("dedup", [
        Setting("window_ms", float, 50.0,
                "A packet seen on another interface at most this long before or after is a "
                "duplicate.", positive=True, maximum=10_000),
        Setting("hash_bytes", int, 128,
                "Bytes of each packet hashed, from the IP header on (mutable fields left out).",
                minimum=20, maximum=65535),
        Setting("max_entries", int, 1 << 18,
                "Packets remembered at most; the oldest are forgotten first.", minimum=1024,
                maximum=1 << 26),
    ])


@hookimpl
def ossensor_packet_filter(config: SensorConfig) -> Dedup:
    settings = config.plugin("dedup")
    return Dedup(settings.window_ms / 1000, settings.hash_bytes, settings.max_entries)


class Dedup:
    """Drops packets already seen on another interface within the window (per batch)."""

    name = "dedup"

    def __init__(self, window_seconds: float = 0.05, hash_bytes: int = 128,
                 max_entries: int = 1 << 18) -> None:
        self.window_ns = int(window_seconds * 1e9)
        self.hash_bytes = hash_bytes
        self.max_entries = max_entries
        # key -> timestamp_ns << 32 | ifindex (one int, not a tuple: a full table at the default
        # max_entries takes 34 MiB instead of 50); insertion order is (nearly) time order.
        self.seen: dict[int, int] = {}
        self.latest_ns = 0
        self.dropped = 0
        self.packets = 0

    def filter(self, batch: PacketBatch) -> PacketBatch:
        data = batch.data
        view = memoryview(data)
        unpack = _RECORD.unpack_from
        walk = network_header
        seen = self.seen
        window = self.window_ns
        limit = self.hash_bytes
        ifindex = batch.ifindex
        linktype = batch.linktype
        ethernet = linktype == LINKTYPE_ETHERNET
        kept = array("I")
        keep = kept.append
        latest = self.latest_ns
        dropped = 0
        offsets = batch.offsets() if batch.sliced else None
        offset = 0
        for index in range(batch.count):
            if offsets is not None:
                offset = offsets[index]
            step, sec, nsec, snaplen, _, _, mac = unpack(data, offset)
            start = offset + mac
            end = start + snaplen
            # An untagged Ethernet frame is read here; every other case (VLAN tags, other
            # link types, short frames) through network_header: a call per packet costs about
            # 90 ns, 6 % of the filter (bench: dedup on 512-packet batches).
            if ethernet and snaplen >= 14 and data[start + 12] != 0x81 and data[start + 12] != 0x88:
                ethertype, l3 = data[start + 12] << 8 | data[start + 13], start + 14
            else:
                ethertype, l3 = walk(data, start, end, linktype)
            stop = l3 + limit if l3 + limit < end else end
            if ethertype == ETH_P_IP and stop - l3 >= 20:
                # Without TTL (byte 8), protocol (9, in the key instead) and checksum (10-11).
                digest = crc32(view[l3 + 12:stop], crc32(view[l3:l3 + 8])) | data[l3 + 9] << 56
            elif ethertype == ETH_P_IPV6 and stop - l3 >= 40:  # without the hop limit (7)
                digest = crc32(view[l3 + 8:stop], crc32(view[l3:l3 + 7]))
            else:
                digest = crc32(view[l3:stop])
            key = digest | (end - l3) << 32 | ethertype << 64
            timestamp = sec * 1_000_000_000 + nsec
            if timestamp > latest:
                latest = timestamp
            entry = seen.get(key)
            if entry is not None:
                if entry & 0xFFFFFFFF != ifindex \
                        and -window <= timestamp - (entry >> 32) <= window:
                    dropped += 1
                    offset += step
                    continue
                del seen[key]  # re-inserted at the end: the front stays the oldest
            seen[key] = timestamp << 32 | ifindex
            keep(offset)
            offset += step
        self.latest_ns = latest
        self.packets += batch.count
        if dropped:
            self.dropped += dropped
            log.log(level(1), "dedup: %d of %d packets from %s seen on another interface "
                    "(%d dropped in all)", dropped, batch.count, batch.interface, self.dropped)
        self._forget(latest - window - HOLD_NS)
        if not dropped:
            return batch
        return PacketBatch(batch.interface, batch.ifindex, batch.linktype, data, len(kept), kept)

    def _forget(self, cutoff: int) -> None:
        """Drop entries older than ``cutoff`` from the front, and any beyond ``max_entries``."""
        seen = self.seen
        excess = len(seen) - self.max_entries
        for key in _front(seen, excess, cutoff):
            del seen[key]


def _front(seen: dict[int, int], excess: int, cutoff: int) -> list[int]:
    found = []
    for key, entry in seen.items():
        if entry >> 32 >= cutoff and len(found) >= excess:
            break
        found.append(key)
    return found
