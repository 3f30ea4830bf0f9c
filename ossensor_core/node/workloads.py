"""The address ranges of the workloads behind this node (pod CIDRs), found from its routes.

The sensor reports them at registration so that the vSensor can tell which sensor stores the
traffic of which pod (``docs/protocol.md``, "Filters"). CNI plugins route a node's own pods to
local interfaces: a bridge (``cni0``, ``cbr0``, ``docker0``: ``10.244.1.0/24 dev cni0``) or one
veth per pod (Calico ``10.244.1.7 dev cali12ab``, Cilium ``lxc*``). Pods of *other* nodes are
reached through a gateway or a tunnel (``vxlan``, ``ipip``, WireGuard), so the rule is:

A route of the main table is a workload range when it is a unicast route without a gateway,
its output interface is a **veth or a bridge**, that interface carries no default route (a
node whose uplink is a bridge, ``br0``, would otherwise claim its whole LAN), and the prefix is
not loopback, link-local, multicast or unspecified (every veth has ``fe80::/64``). The ranges are
merged. IPv4 and IPv6 alike.

Claiming too little only leaves duplicates; claiming another node's range would make the other
sensors drop traffic that this one never sees, which is why tunnels and gateways are excluded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ossensor_core.errors import InterfaceError

WORKLOAD_KINDS = frozenset({"veth", "bridge"})
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTN_BLACKHOLE = 6


@dataclass(frozen=True)
class Route:
    """The parts of a route that the rule looks at."""

    destination: str  # a prefix, e.g. "10.244.1.0/24"
    oif: int | None
    gateway: bool
    unicast: bool = True
    table: int = RT_TABLE_MAIN
    #: ``blackhole``: Calico marks the address blocks it hands this node's pods so.
    blackhole: bool = False


def workload_ranges(routes: Iterable[Route], kinds: Mapping[int, str]) -> list[str]:
    """Apply the rule; ``kinds`` maps interface index to link kind (``"veth"``, ``"bridge"``)."""
    routes = list(routes)
    uplinks = {r.oif for r in routes
               if r.oif is not None and ipaddress.ip_network(r.destination).prefixlen == 0}
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for route in routes:
        if route.table != RT_TABLE_MAIN or not route.unicast or route.gateway \
                or route.oif is None or route.oif in uplinks \
                or kinds.get(route.oif, "") not in WORKLOAD_KINDS:
            continue
        network = ipaddress.ip_network(route.destination, strict=False)
        first = network.network_address
        if network.prefixlen == 0 or first.is_loopback or first.is_link_local \
                or first.is_multicast or first.is_unspecified:
            continue
        found.append(network)
    merged = [*ipaddress.collapse_addresses(n for n in found if n.version == 4),
              *ipaddress.collapse_addresses(n for n in found if n.version == 6)]
    return [str(n) for n in merged]


def main_table_routes(ipr: Any) -> list[Route]:
    """The main table's IPv4 and IPv6 routes, read on an open pyroute2 ``IPRoute``."""
    routes: list[Route] = []
    for family, zero in ((2, "0.0.0.0"), (10, "::")):
        for message in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            destination = message.get("RTA_DST") or zero
            routes.append(Route(
                f"{destination}/{message['dst_len']}", message.get("RTA_OIF"),
                bool(message.get("RTA_GATEWAY") or message.get("RTA_MULTIPATH")
                     or message.get("RTA_VIA")),
                message["type"] == RTN_UNICAST,
                message.get("RTA_TABLE") or message["table"],
                message["type"] == RTN_BLACKHOLE))
    return routes


def find_workload_ranges() -> list[str]:
    """The rule applied to this network namespace's routes (netlink). Raises InterfaceError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            kinds: dict[int, str] = {}
            for link in ipr.get_links():
                info = link.get("IFLA_LINKINFO")
                kinds[link["index"]] = (info.get("IFLA_INFO_KIND") if info else "") or ""
            routes = main_table_routes(ipr)
    except (OSError, NetlinkError) as exc:
        raise InterfaceError(f"cannot read routes over netlink: {exc}") from exc
    return workload_ranges(routes, kinds)


#: The kernel's text views of the IPv4 main table and the IPv6 routes: cheap to read, and they
#: change whenever a route that the rule looks at does.
ROUTE_FILES = ("/proc/net/route", "/proc/net/ipv6_route")


class WorkloadFinder:
    """:func:`find_workload_ranges`, asked over netlink only when the routes changed.

    Heartbeats ask every few seconds; a netlink dump decoded by pyroute2 costs about 8 ms of
    CPU, reading the two /proc files about a hundredth of that.
    """

    def __init__(self, find: Callable[[], list[str]] = find_workload_ranges,
                 files: Iterable[str] = ROUTE_FILES) -> None:
        self._find = find
        self._files = tuple(files)
        self._seen: bytes | None = None
        self._ranges: list[str] = []

    def _fingerprint(self) -> bytes | None:
        parts = []
        for name in self._files:
            try:
                with open(name, "rb") as table:
                    parts.append(table.read())
            except OSError:
                return None  # cannot tell: ask netlink every time
        return b"\0".join(parts)

    def __call__(self) -> list[str]:
        seen = self._fingerprint()
        if seen is None or seen != self._seen:
            self._ranges = self._find()  # InterfaceError leaves the last fingerprint unchanged
            self._seen = seen
        return list(self._ranges)
