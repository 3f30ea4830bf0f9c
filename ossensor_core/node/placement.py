"""Single-copy capture: which capture point of the node keeps which packet, decided in the kernel.

With every interface captured, a pod's packet crosses its veth and then the uplink, or two pods'
veths, or an overlay device and (encapsulated) the uplink. Rather than hashing every packet in
Python (the ``dedup`` plugin), each interface gets a kernel filter, derived from the node's
links, routes and addresses, that keeps exactly the copies no other capture point keeps. The
direction is the kernel's own mark: ``inbound``/``outbound`` in libpcap's syntax compile to
loads of ``SKF_AD_PKTTYPE``, which only the kernel evaluates (libpcap's interpreter cannot).

The roles and what each keeps (``LOCAL`` is the node's own addresses, its workload ranges, its
blackhole routes (Calico's address blocks for the node's pods), the Service ranges and
``fe80::/10``):

``pod-veth``   the host end of a pod's veth, not in a bridge (Calico, Cilium, point to point):
               inbound (from the pod) when it is not IP, is group-addressed or goes to ``LOCAL``;
               outbound when it is not IP or comes from the node itself (its own addresses,
               link-local ones included). Traffic between the pod and other hosts is the
               uplink's (or the overlay's).
``bridge-port`` a pod's veth in a bridge of pod veths (``cni0``, ``docker0``): inbound as above;
               outbound only unicast IP from the node's own addresses (what the node floods into
               the bridge is kept once, on the bridge).
``pod-bridge`` that bridge: outbound non-IP or group-addressed frames (the node's own ARP and
               multicast); what enters it from a port was kept on the port.
``uplink``     an interface with a default route, or a physical one: everything but the
               encapsulated copies of the overlays that this node captures (VXLAN, Geneve,
               WireGuard over UDP, IPIP, SIT, GRE), so traffic to and from other hosts is kept in
               the form the other side's sensor sees (after masquerading).
``overlay``    a tunnel device: everything, the inner packet once.
``unplaced``   what the rules cannot place (bonds and their slaves, VLAN, macvlan and ipvlan
               devices, bridges with other ports than pod veths, a veth whose peer is on the
               node): everything, and the interface is named with the advice to load ``dedup``.

Every rule is compiled with the bounds checks of ``capture/bounded.py``, so a frame cut short
before a field a rule reads is kept (a classic BPF load past the end would reject it).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ossensor_core.errors import InterfaceError
from ossensor_core.node.interfaces import addresses_by_index
from ossensor_core.node.workloads import main_table_routes, workload_ranges

Role = Literal["uplink", "pod-veth", "bridge-port", "pod-bridge", "overlay", "unplaced"]

#: Tunnel devices whose inner packets the node's capture sees once, on the device.
OVERLAY_KINDS = frozenset({"vxlan", "geneve", "ipip", "gre", "gretap", "ip6gre", "ip6gretap",
                           "sit", "ip6tnl", "wireguard", "tun"})
#: How each overlay's encapsulated copy looks on the uplink (libpcap syntax).
ENCAPSULATION: Mapping[str, tuple[str, ...]] = {
    "vxlan": ("udp dst port 4789", "udp dst port 8472"),  # IANA's port, and Linux's (flannel)
    "geneve": ("udp dst port 6081",),
    "wireguard": ("udp port 51820",),
    "ipip": ("ip proto 4", "ip6 proto 4"),
    "sit": ("ip proto 41",),
    "ip6tnl": ("ip6 proto 41", "ip6 proto 4"),
    "gre": ("ip proto 47",), "gretap": ("ip proto 47",),
    "ip6gre": ("ip6 proto 47",), "ip6gretap": ("ip6 proto 47",),
}
#: Kinds that carry another interface's frames, so the same packet is seen twice.
STACKED_KINDS = frozenset({"bond", "team", "vlan", "macvlan", "macvtap", "ipvlan", "ipvtap",
                           "bond_slave", "team_slave"})
#: Physical interfaces have no kind; dummies (kube-ipvs0, nodelocaldns) carry nothing.
UPLINK_KINDS = frozenset({"", "dummy"})
LINK_LOCAL6 = "fe80::/10"
DEDUP_ADVICE = "load the dedup plugin (OSSENSOR_PLUGINS=dedup) to store it once"


@dataclass(frozen=True)
class Link:
    """What the rules read of one interface."""

    index: int
    name: str
    kind: str = ""
    master: int | None = None
    addresses: tuple[str, ...] = ()
    #: A veth whose other end lives in another network namespace (a pod's).
    peer_elsewhere: bool = False


@dataclass(frozen=True)
class NodeView:
    """The node as the rules see it: links, the interfaces of default routes, workload ranges."""

    links: tuple[Link, ...]
    default_oifs: frozenset[int] = frozenset()
    workloads: tuple[str, ...] = ()
    #: Blackhole routes of the main table: the address blocks Calico hands this node's pods,
    #: so a pod is local from its first packet, before its own /32 route is read.
    blocks: tuple[str, ...] = ()

    def own_addresses(self) -> list[str]:
        return [a.split("%")[0] for link in self.links for a in link.addresses]


@dataclass(frozen=True)
class Rules:
    """The settings that shape the rules."""

    services: tuple[str, ...] = ()
    pod_copy: bool = False
    keep_encapsulated: bool = False


@dataclass(frozen=True)
class Placement:
    """One interface's role, its filter (``""``: keeps everything) and why, in words."""

    name: str
    role: Role
    expression: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The placement of every interface of the node."""

    placements: Mapping[int, Placement] = field(default_factory=dict)

    def expression(self, index: int) -> str:
        """The filter for an interface; one the plan does not know keeps everything."""
        placement = self.placements.get(index)
        return placement.expression if placement is not None else ""

    def unplaced(self) -> list[Placement]:
        return [p for p in self.placements.values() if p.role == "unplaced"]

    def notes(self) -> list[str]:
        """One line per interface the rules cannot place, with the advice."""
        return [f"{p.name}: {p.reason}; its packets may be stored twice: {DEDUP_ADVICE}"
                for p in self.unplaced()]


def _hosts(addresses: Iterable[str]) -> list[str]:
    """Addresses and prefixes, collapsed per family, as libpcap ``net`` operands."""
    networks = [ipaddress.ip_network(a, strict=False) for a in addresses]
    merged = [*ipaddress.collapse_addresses(n for n in networks if n.version == 4),
              *ipaddress.collapse_addresses(n for n in networks if n.version == 6)]
    return [str(n) for n in merged]


def _any_of(qualifier: str, networks: Sequence[str]) -> str:
    """``(ip dst net a or ip6 dst net b ...)``: the family's qualifier first, so an IPv4
    prefix is never compared with an IPv6 header."""
    parts = [f"{'ip' if ':' not in n else 'ip6'} {qualifier} net {n}" for n in networks]
    return "(" + " or ".join(parts) + ")" if parts else ""


NOT_IP = "not ip and not ip6"
GROUP = "ether multicast"  # the group bit of the destination MAC: broadcast and multicast
NEVER = "(ip and not ip)"


def _pod_rule(local: Sequence[str], own: Sequence[str], bridged: bool, pod_copy: bool) -> str:
    """A pod's veth (``bridged``: a port of a bridge of pods' veths); see the module docstring.
    ``pod_copy`` adds the copies between the pod and other hosts as the pod sees them."""
    to_local = _any_of("dst", local)
    from_node = _any_of("src", own) or NEVER
    keep_in = "inbound" if pod_copy else f"inbound and ({NOT_IP} or {GROUP} or {to_local})"
    if bridged:
        keep_out = f"outbound and (ip or ip6) and not {GROUP} and {from_node}"
    else:
        keep_out = f"outbound and ({NOT_IP} or {from_node})"
    if pod_copy:
        # From other hosts to the pod: the uplink keeps its copy too (never replaced).
        keep_out = f"({keep_out}) or (outbound and (ip or ip6) and not {GROUP} and not " \
                   f"{_any_of('src', local)})"
    return f"({keep_in}) or ({keep_out})"


def _uplink_rule(rules: Rules, captured: Mapping[int, Link]) -> str:
    """Everything but the encapsulated copies of the tunnels captured on the node."""
    if rules.keep_encapsulated:
        return ""
    found: list[str] = []
    for link in captured.values():
        for match in ENCAPSULATION.get(link.kind, ()):
            if match not in found:
                found.append(match)
    return f"not ({' or '.join(found)})" if found else ""


def plan(view: NodeView, rules: Rules) -> Plan:
    """Place every link of ``view`` (all of them are captured: the rules hold only then)."""
    by_index = {link.index: link for link in view.links}
    ports: dict[int, list[Link]] = {}
    for link in view.links:
        if link.master is not None:
            ports.setdefault(link.master, []).append(link)

    def pod_bridge(index: int) -> bool:
        link = by_index.get(index)
        return link is not None and link.kind == "bridge" and index not in view.default_oifs \
            and all(p.kind == "veth" and p.peer_elsewhere for p in ports.get(index, []))

    own = view.own_addresses()
    local = _hosts([*own, *view.workloads, *view.blocks, *rules.services, LINK_LOCAL6])
    own_routable = [a for a in own if not ipaddress.ip_address(a).is_link_local]
    uplink = _uplink_rule(rules, by_index)
    placements: dict[int, Placement] = {}

    def place(link: Link) -> Placement:
        master = by_index.get(link.master) if link.master is not None else None
        if link.index in view.default_oifs:
            if link.kind == "bridge" and ports.get(link.index):
                return Placement(link.name, "unplaced", "", "a bridge that carries a default "
                                 "route: a packet is seen on it and on its port")
            if link.kind in STACKED_KINDS and link.kind != "bond" and link.kind != "team":
                return Placement(link.name, "unplaced", "", f"a {link.kind} device: its packets "
                                 "are also seen on the interface below it")
            return Placement(link.name, "uplink", uplink, "carries a default route")
        if master is not None:
            if master.kind == "bridge" and pod_bridge(master.index):
                # The bridge's own link-local addresses: what the node sends from them.
                bridge_own = [*own_routable, *(a.split("%")[0] for a in master.addresses)]
                return Placement(link.name, "bridge-port",
                                 _pod_rule(local, _hosts(bridge_own), True, rules.pod_copy),
                                 f"a pod's veth in bridge {master.name}")
            return Placement(link.name, "unplaced", "", f"a port of {master.kind or 'device'} "
                             f"{master.name}: its packets are also seen there")
        if link.kind == "veth":
            if not link.peer_elsewhere:
                return Placement(link.name, "unplaced", "", "a veth whose other end is on the "
                                 "node too: a packet is seen at both ends")
            return Placement(link.name, "pod-veth",
                             _pod_rule(local, _hosts([*own_routable, LINK_LOCAL6]), False,
                                       rules.pod_copy), "a pod's veth")
        if link.kind == "bridge":
            if pod_bridge(link.index):
                return Placement(link.name, "pod-bridge", f"outbound and ({NOT_IP} or {GROUP})",
                                 "a bridge of pods' veths: their copies are kept on the veths")
            return Placement(link.name, "unplaced", "", "a bridge with other ports than pods' "
                             "veths: a packet is seen on it and on a port")
        if link.kind in OVERLAY_KINDS:
            return Placement(link.name, "overlay", "", f"a {link.kind} tunnel: the inner "
                             "packet, once")
        if link.kind in STACKED_KINDS:
            return Placement(link.name, "unplaced", "", f"a {link.kind} device: its packets "
                             "are also seen on the interface below or above it")
        if link.kind in UPLINK_KINDS:
            return Placement(link.name, "uplink", uplink, "a physical interface")
        return Placement(link.name, "unplaced", "", f"an interface of kind {link.kind!r} that "
                         "the rules do not know")

    for link in view.links:
        placements[link.index] = place(link)
    return Plan(placements)


# -- reading the node over netlink ---------------------------------------------------------------


def read_node_view() -> NodeView:
    """Links, addresses, default routes and workload ranges of this network namespace, in one
    netlink session. Raises InterfaceError."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            addresses = addresses_by_index(ipr)
            links: list[Link] = []
            kinds: dict[int, str] = {}
            for message in ipr.get_links():
                info = message.get("IFLA_LINKINFO")
                kind = (info.get("IFLA_INFO_KIND") if info else "") or ""
                kinds[message["index"]] = kind
                if message["flags"] & 0x8:  # IFF_LOOPBACK: never captured
                    continue
                links.append(Link(
                    message["index"], message.get("IFLA_IFNAME") or "", kind,
                    message.get("IFLA_MASTER") or None, tuple(addresses.get(message["index"], ())),
                    kind == "veth" and message.get("IFLA_LINK_NETNSID") is not None))
            routes = main_table_routes(ipr)
    except (OSError, NetlinkError) as exc:
        raise InterfaceError(f"cannot read the node's links and routes over netlink: {exc}") \
            from exc
    defaults = frozenset(r.oif for r in routes if r.oif is not None
                         and ipaddress.ip_network(r.destination).prefixlen == 0)
    blocks = tuple(r.destination for r in routes
                   if r.blackhole and ipaddress.ip_network(r.destination).prefixlen > 0)
    return NodeView(tuple(links), defaults, tuple(workload_ranges(routes, kinds)), blocks)


#: How long a burst of netlink events (a pod's veth, its address, its route) may run before the
#: rules are computed again: one computation per burst, well within a second.
SETTLE_SECONDS = 0.05


async def node_changes(wake: asyncio.Event) -> AsyncIterator[None]:
    """Yield once after each burst of link, address or route events of this network namespace,
    or after ``wake`` is set, when no event came for :data:`SETTLE_SECONDS`. The subscription
    starts first, then one change is yielded at once, so nothing between a first reading of the
    node and the subscription is missed. Raises InterfaceError when netlink fails."""
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR,
                                       RTMGRP_IPV6_ROUTE, RTMGRP_LINK)

    groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE \
        | RTMGRP_IPV6_ROUTE

    async def listen(ipr: AsyncIPRoute) -> None:
        while True:
            async for _ in ipr.get():
                wake.set()

    try:
        async with AsyncIPRoute() as ipr:
            await ipr.bind(groups=groups)
            listener = asyncio.create_task(listen(ipr), name="placement-netlink")
            listener.add_done_callback(lambda _: wake.set())
            wake.set()
            try:
                while True:
                    await wake.wait()
                    while wake.is_set():  # settle: until a quiet SETTLE_SECONDS
                        wake.clear()
                        await asyncio.sleep(SETTLE_SECONDS)
                    if listener.done():
                        listener.result()  # its error, raised here
                    yield
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
    except (OSError, NetlinkError) as exc:
        raise InterfaceError(f"the netlink watch of links, addresses and routes failed: {exc}") \
            from exc
