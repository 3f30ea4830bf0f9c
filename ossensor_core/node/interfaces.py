"""Interface discovery and selection, and the netlink watch for interfaces that come and go.

Selection follows the original's start-up script, with ``grep -E`` semantics for the patterns:
every interface but loopback; an interface is dropped when any exclude pattern matches its name;
then, when an include list is given, it is kept only when some include pattern matches. With
``OSSENSOR_NETWORK_DEVICE`` set, that interface alone is captured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ossensor_core.capture.bpf import ARPHRD_TO_LINKTYPE
from ossensor_core.node.patterns import ExtendedRegex
from ossensor_core.errors import InterfaceError

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
ARPHRD_LOOPBACK = 772


@dataclass(frozen=True)
class Interface:
    """A network interface as netlink reports it."""

    name: str
    index: int
    arphrd: int
    flags: int
    addresses: tuple[str, ...] = ()
    kind: str = ""

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK) or self.arphrd == ARPHRD_LOOPBACK

    @property
    def routable_addresses(self) -> tuple[str, ...]:
        """Addresses that can identify the sensor: link-local ones (fe80::/10) cannot."""
        return tuple(a for a in self.addresses
                     if not ipaddress.ip_address(a.split("%")[0]).is_link_local)

    @property
    def linktype(self) -> int | None:
        """The pcap link type of its frames, or None when we cannot capture this kind."""
        return ARPHRD_TO_LINKTYPE.get(self.arphrd)


@dataclass(frozen=True)
class Decision:
    """Whether an interface is captured, and why, in words a user can act on."""

    interface: Interface
    selected: bool
    reason: str


@dataclass(frozen=True)
class InterfaceSelector:
    """The include/exclude rules, compiled once; applied at start-up and to later interfaces."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    device: str = ""
    _include: tuple[ExtendedRegex, ...] = field(init=False, repr=False, compare=False)
    _exclude: tuple[ExtendedRegex, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", tuple(ExtendedRegex(p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(ExtendedRegex(p) for p in self.exclude))

    def name_selected(self, name: str) -> tuple[bool, str]:
        """Apply the pattern rules to a name alone (loopback and link type aside)."""
        if self.device:
            if name == self.device:
                return True, "named by OSSENSOR_NETWORK_DEVICE"
            return False, "OSSENSOR_NETWORK_DEVICE names another interface"
        for regex in self._exclude:
            if regex.search(name):
                return False, f"excluded by pattern {regex.pattern!r}"
        if not self._include:
            return True, "no include list: every interface but loopback"
        for regex in self._include:
            if regex.search(name):
                return True, f"included by pattern {regex.pattern!r}"
        return False, "matches no include pattern"

    def decide(self, interface: Interface) -> Decision:
        if interface.loopback:
            return Decision(interface, False, "loopback is never captured")
        selected, reason = self.name_selected(interface.name)
        if selected and interface.linktype is None:
            return Decision(interface, False,
                            f"link type ARPHRD {interface.arphrd} cannot be captured")
        return Decision(interface, selected, reason)

    def select(self, interfaces: Iterable[Interface]) -> list[Interface]:
        return [d.interface for d in map(self.decide, interfaces) if d.selected]


def _link_to_interface(message: dict, addresses: dict[int, list[str]]) -> Interface:
    index = message["index"]
    kind = ""
    linkinfo = message.get("IFLA_LINKINFO") if hasattr(message, "get") else None
    if linkinfo is not None:
        kind = linkinfo.get("IFLA_INFO_KIND") or ""
    return Interface(
        name=message.get("ifname"),
        index=index,
        arphrd=message["ifi_type"],
        flags=message["flags"],
        addresses=tuple(addresses.get(index, ())),
        kind=kind,
    )


def addresses_by_index(ipr: Any) -> dict[int, list[str]]:
    """The addresses of every interface of an open pyroute2 ``IPRoute``, by interface index."""
    addresses: dict[int, list[str]] = {}
    for message in ipr.get_addr():
        address = message.get("IFA_ADDRESS")
        if address:
            addresses.setdefault(message["index"], []).append(address)
    return addresses


def list_interfaces() -> list[Interface]:
    """Every interface of this network namespace, in index order, with its addresses."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            addresses = addresses_by_index(ipr)
            links = [_link_to_interface(m, addresses) for m in ipr.get_links()]
    except (OSError, NetlinkError) as exc:
        raise InterfaceError(f"cannot list interfaces over netlink: {exc}") from exc
    return sorted(links, key=lambda i: i.index)


def default_route_interfaces() -> list[int]:
    """Indexes of the interfaces that carry a default route, IPv4 first."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    found: list[int] = []
    try:
        with IPRoute() as ipr:
            for family in (2, 10):  # AF_INET, AF_INET6
                for route in ipr.get_routes(family=family, table=254):
                    if route["dst_len"] == 0 and route.get("RTA_OIF"):
                        found.append(route.get("RTA_OIF"))
    except (OSError, NetlinkError) as exc:
        raise InterfaceError(f"cannot read routes over netlink: {exc}") from exc
    return found


@dataclass(frozen=True)
class Primary:
    """The interface whose address identifies the sensor, and how it was chosen."""

    name: str | None
    how: str


def primary_interface(interfaces: Sequence[Interface], selected: Sequence[Interface],
                      device: str) -> Primary:
    """``OSSENSOR_NETWORK_DEVICE``, else the default-route interface, else the first selected
    interface with an address. No primary at all is not an error (a namespace without addresses)."""
    if device:
        return Primary(device, "OSSENSOR_NETWORK_DEVICE")
    by_index = {i.index: i for i in interfaces}
    for index in default_route_interfaces():
        if index in by_index:
            return Primary(by_index[index].name, "default route")
    for interface in selected:
        if interface.routable_addresses:
            return Primary(interface.name, "first selected interface with an address "
                                           "(no default route)")
    return Primary(None, "no default route and no selected interface has an address")


EventKind = Literal["added", "removed", "up", "down"]


@dataclass(frozen=True)
class InterfaceEvent:
    """A change to the set of captured interfaces. ``added`` opens a capture, ``removed`` closes
    it; ``up``/``down`` are reported for interfaces already captured (their capture stays open)."""

    kind: EventKind
    interface: Interface


class InterfaceWatch:
    """Follows netlink link events and reports changes to the selected set.

    With ``device_any`` every interface that appears (or is renamed into a matching name) and
    passes the selector is added; without it, only the names selected at start-up are followed,
    so one that is deleted and re-created, or goes down and comes up, is picked up again.
    """

    def __init__(self, decide: Callable[[Interface], Decision], device_any: bool,
                 initial: Iterable[Interface]) -> None:
        self.decide = decide
        self.device_any = device_any
        self.tracked: dict[int, Interface] = {}
        self.allowed_names: set[str] = set()
        for interface in initial:
            if decide(interface).selected:
                self.tracked[interface.index] = interface
                self.allowed_names.add(interface.name)

    def _allowed(self, interface: Interface) -> bool:
        if not self.decide(interface).selected:
            return False
        return self.device_any or interface.name in self.allowed_names

    def apply(self, interface: Interface, deleted: bool) -> list[InterfaceEvent]:
        """Fold one link message into the state; return the events it causes."""
        old = self.tracked.get(interface.index)
        if deleted:
            if old is None:
                return []
            del self.tracked[interface.index]
            return [InterfaceEvent("removed", old)]
        if old is not None and old.name != interface.name:
            del self.tracked[interface.index]
            events = [InterfaceEvent("removed", old)]
            return events + self.apply(interface, deleted=False)
        if old is None:
            if not self._allowed(interface):
                return []
            self.tracked[interface.index] = interface
            return [InterfaceEvent("added", interface)]
        self.tracked[interface.index] = interface
        if old.up != interface.up:
            return [InterfaceEvent("up" if interface.up else "down", interface)]
        return []

    async def events(self) -> AsyncIterator[InterfaceEvent]:
        """Yield events until cancelled. The netlink subscription starts before the state is
        re-read, so an interface created during start-up is not missed."""
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        try:
            async with AsyncIPRoute() as ipr:
                await ipr.bind(groups=RTMGRP_LINK)
                current = await asyncio.to_thread(list_interfaces)
                seen = {i.index for i in current}
                for index in [i for i in self.tracked if i not in seen]:
                    for event in self.apply(self.tracked[index], deleted=True):
                        yield event
                for interface in current:
                    for event in self.apply(interface, deleted=False):
                        yield event
                while True:
                    async for message in ipr.get():
                        event_name = message.get("event")
                        if event_name not in ("RTM_NEWLINK", "RTM_DELLINK"):
                            continue
                        interface = _link_to_interface(message, {})
                        if interface.name is None:
                            continue
                        for event in self.apply(interface, event_name == "RTM_DELLINK"):
                            yield event
        except (OSError, NetlinkError) as exc:
            raise InterfaceError(f"the netlink interface watch failed: {exc}") from exc
