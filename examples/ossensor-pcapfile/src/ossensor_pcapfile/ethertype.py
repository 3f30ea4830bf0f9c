"""The ``ethertype`` filter: drop Ethernet frames whose EtherType is listed.

``OSSENSOR_ETHERTYPE_DROP=0x86dd,0x0806`` drops IPv6 and ARP, for example. The EtherType is the
one after any 802.1Q/802.1ad tags in the frame (a tag the kernel stripped is in the record
header, and the EtherType follows the MAC addresses directly).
"""

from __future__ import annotations

from ossensor_core.plugin import (LINKTYPE_ETHERNET, ConfigError, PacketBatch, SensorConfig,
                                  Setting, SettingsGroup, hookimpl, network_header, split_words)

VARIABLE = "OSSENSOR_ETHERTYPE_DROP"


def parse_ethertypes(text: str) -> frozenset[int]:
    """``"0x86dd, 2054"`` -> {0x86DD, 0x0806}; raises ValueError naming a bad word."""
    found = set()
    for word in split_words(text):
        try:
            value = int(word, 0)
        except ValueError:
            raise ValueError(f"{word!r} is not a number (write 0x86dd or 34525)") from None
        if not 0x0600 <= value <= 0xFFFF:
            raise ValueError(f"{word!r} is not an EtherType (0x0600 to 0xffff)")
        found.add(value)
    return frozenset(found)


class EtherTypeFilter:
    """Drops frames whose EtherType is in ``drop``; other link types pass untouched."""

    name = "ethertype"

    def __init__(self, drop: frozenset[int]) -> None:
        self.drop = drop
        self.dropped = 0

    def filter(self, batch: PacketBatch) -> PacketBatch:
        if batch.linktype != LINKTYPE_ETHERNET or not self.drop:
            return batch
        data = batch.data
        keep = []
        for index, (offset, _, _, snaplen, _, _, mac, _, _) in enumerate(batch.headers()):
            start = offset + mac
            ethertype, _ = network_header(data, start, start + snaplen, LINKTYPE_ETHERNET)
            if ethertype not in self.drop:
                keep.append(index)
        self.dropped += batch.count - len(keep)
        return batch if len(keep) == batch.count else batch.select(keep)


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("ethertype", [
        Setting("drop", str, "", "EtherTypes to drop, e.g. 0x86dd,0x0806 (IPv6 and ARP)."),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    try:
        parse_ethertypes(config.plugin("ethertype").drop)
    except ValueError as exc:
        raise ConfigError([f"{VARIABLE}: {exc}"]) from exc


@hookimpl
def ossensor_packet_filter(config: SensorConfig) -> EtherTypeFilter:
    return EtherTypeFilter(parse_ethertypes(config.plugin("ethertype").drop))
