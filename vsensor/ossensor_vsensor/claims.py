"""Which claims a sensor may make: its addresses and workload ranges, within bounds.

Every sensor holds the one shared key, so a compromised node could claim
``1.0.0.0-223.255.255.255``, or addresses it does not have, and make every other sensor drop
that traffic under the lower-address rule (``filters.py``). A claim is therefore taken only
when it lies inside one network of the allow-list and is no wider than a prefix length; the
others are ignored (the registration still succeeds) and shown on the status pages with the
reason.

The default allow-list holds the ranges a cluster's nodes and pods live in: private (RFC 1918),
shared (RFC 6598, ``100.64.0.0/10``: carrier-grade NAT, some CNIs) and unique-local IPv6
(``fc00::/7``). Nodes with public addresses need ``--claims-allow``. Loopback, link-local,
multicast and unspecified addresses are never claimed (``filters.claimed_set`` leaves them out
whatever this list says) and are not shown as ignored: every host has them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ossensor_core.capture.peer_exclusion import parse_range

from .filters import parse_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_CLAIMS_ALLOW: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                         "100.64.0.0/10", "fc00::/7")
#: The widest claim taken: a /16 holds a cluster's IPv4 pod network or Docker's default bridge
#: (172.17.0.0/16, claimed by every Docker host and so by nobody); a node's own pod range is a
#: /24 or narrower. IPv6: a /48 is a whole site; a node's pod range is a /64 to /80.
DEFAULT_MAX_PREFIX_V4 = 16
DEFAULT_MAX_PREFIX_V6 = 48
#: Ignored claims kept per sensor for the status pages (the count is kept in full).
IGNORED_SHOWN = 32


def parse_allow(texts: Iterable[str], option: str = "--claims-allow") -> tuple[IPNetwork, ...]:
    """Networks from ``CIDR[,CIDR]`` texts: plain networks only (no host bits, no scope id);
    ValueError names the option and the entry."""
    networks: list[IPNetwork] = []
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            try:
                if not item:
                    raise ValueError("an empty entry")
                if "%" in item:
                    raise ValueError("a scope id")
                if "/" not in item:
                    raise ValueError("no prefix length")
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                raise ValueError(f"{option} {item[:64]!r}: not a network in CIDR form "
                                 f"({exc})") from None
    return tuple(networks)


def _usable(address: IPAddress) -> bool:
    return not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified)


@dataclass(frozen=True)
class ClaimPolicy:
    """The allow-list and the widest prefix per IP version."""

    allow: tuple[IPNetwork, ...] = field(
        default_factory=lambda: parse_allow(DEFAULT_CLAIMS_ALLOW))
    max_prefix_v4: int = DEFAULT_MAX_PREFIX_V4
    max_prefix_v6: int = DEFAULT_MAX_PREFIX_V6

    def refusal(self, first: IPAddress, last: IPAddress) -> str:
        """Why the range ``first``-``last`` cannot be claimed ("" when it can)."""
        bits, prefix = (32, self.max_prefix_v4) if first.version == 4 else \
            (128, self.max_prefix_v6)
        if int(last) - int(first) + 1 > 1 << (bits - prefix):
            return f"wider than a /{prefix}"
        if not any(first in net and last in net for net in self.allow
                   if net.version == first.version):
            return "outside the claims allow-list"
        return ""

    def sort(self, addresses: Sequence[str], workloads: Sequence[str]
             ) -> tuple[list[str], list[str], list[dict[str, str]]]:
        """(addresses kept, workloads kept, ignored claims as ``{"claim", "reason"}``).
        ValueError names an entry that is not an address or range at all."""
        ignored: list[dict[str, str]] = []
        kept_addresses = []
        for text in addresses:
            address = parse_address(text)
            reason = self.refusal(address, address) if _usable(address) else ""
            if reason:
                ignored.append({"claim": str(text)[:64], "reason": reason})
            else:
                kept_addresses.append(text)
        kept_workloads = []
        for text in workloads:
            first, last = parse_range(text)
            reason = self.refusal(first, last) if _usable(first) and _usable(last) else ""
            if reason:
                ignored.append({"claim": str(text)[:100], "reason": reason})
            else:
                kept_workloads.append(text)
        return kept_addresses, kept_workloads, ignored
