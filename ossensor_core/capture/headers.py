"""The walk from a captured frame's link-layer header to its network (IP) header.

Written once here for every stage that looks inside packets (the ``dedup`` and ``slice``
filters, Antigena's segment parser, third-party filters) and for the EtherType constants.
It runs per packet inside per-batch loops: pure, no allocation, plain integer reads.
"""

from __future__ import annotations

from ossensor_core.wire.names import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW

# EtherTypes (``ETH_P_*`` in <linux/if_ether.h>); ETH_P_ALL is the packet socket's "every
# protocol", not an EtherType on the wire.
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100  # a VLAN tag (C-tag)
ETH_P_IPV6 = 0x86DD
ETH_P_8021AD = 0x88A8  # an outer VLAN tag (S-tag, "QinQ")
#: The tag protocol identifiers of the VLAN tags a frame may carry before its EtherType.
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)

ETHERNET_HEADER = 14
LINUX_SLL_HEADER = 16


def network_header(data: bytes | bytearray | memoryview, start: int, end: int,
                   linktype: int) -> tuple[int, int]:
    """``(EtherType, offset of the network header)`` of the frame ``data[start:end]``.

    Ethernet: the EtherType after any 802.1Q/802.1ad tags in the frame (a tag the kernel
    stripped into the record header is not in it); raw IP (``LINKTYPE_RAW``): ``ETH_P_IP`` or
    ``ETH_P_IPV6`` from the version nibble; Linux cooked capture: its protocol field. ``(0,
    start)`` when the frame is too short or of another link type.
    """
    if linktype == LINKTYPE_ETHERNET:
        if end - start < ETHERNET_HEADER:
            return 0, start
        ethertype = data[start + 12] << 8 | data[start + 13]
        l3 = start + ETHERNET_HEADER
        while (ethertype == ETH_P_8021Q or ethertype == ETH_P_8021AD) and l3 + 4 <= end:
            ethertype = data[l3 + 2] << 8 | data[l3 + 3]
            l3 += 4
        return ethertype, l3
    if linktype == LINKTYPE_RAW:
        if end <= start:
            return 0, start
        return (ETH_P_IP if data[start] >> 4 == 4 else ETH_P_IPV6), start
    if linktype == LINKTYPE_LINUX_SLL and end - start >= LINUX_SLL_HEADER:
        return data[start + 14] << 8 | data[start + 15], start + LINUX_SLL_HEADER
    return 0, start
