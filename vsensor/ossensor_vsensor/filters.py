"""The BPF expression the vSensor hands each sensor (ANDed by the sensor with its own).

Two parts:

* ``not (host <vSensor address> and tcp port <ports>)``: the sensor's own uploads.
* ``not (dst net A or dst net B ...)``: packets addressed to another registered sensor.
  Only the *destination* is excluded, on purpose: with both directions excluded, sensors A and B
  would each drop the A<->B flow and it would be stored nowhere. Excluding packets *to* a peer
  leaves each packet stored exactly once, by the sensor of the host that receives it.
  Addresses a sensor has itself (``172.17.0.1`` on every Docker host) are never peers of it, and
  loopback, link-local, multicast and unspecified addresses are ignored.

The peer part is left out when the compiled program would exceed the kernel's limit (duplicates
are better than a blind sensor); compiling a filter with hundreds of networks takes seconds, so
:func:`build_filter` is meant to run in a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ossensor_core.bpf import compile_filter
from ossensor_core.errors import FilterError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FilterResult:
    expression: str
    peers_dropped: bool  # the peer part was left out (too long, or it did not compile)
    reason: str = ""


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address; an IPv6 zone (``fe80::1%eth0``) is dropped. Raises ValueError."""
    return ipaddress.ip_address(str(text).split("%", 1)[0].strip())


def _usable(address) -> bool:
    return not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified)


def peer_networks(own: Iterable[str], others: Iterable[str]) -> list[IPNetwork]:
    """Other sensors' addresses minus our own, merged into as few CIDR blocks as possible."""
    mine = {parse_address(a) for a in own}
    peers = {a for a in map(parse_address, others) if a not in mine and _usable(a)}
    nets: list[IPNetwork] = []
    for version in (4, 6):
        nets += ipaddress.collapse_addresses(
            ipaddress.ip_network(a) for a in sorted(peers, key=int) if a.version == version)
    return nets


def self_expression(vsensor_address: str, ports: Iterable[int]) -> str:
    ports = sorted(set(ports))
    port_part = " or ".join(f"tcp port {p}" for p in ports)
    if len(ports) > 1:
        port_part = f"({port_part})"
    return f"not (host {parse_address(vsensor_address)} and {port_part})"


def peers_expression(nets: Iterable[IPNetwork]) -> str:
    terms = [f"dst net {net}" for net in nets]
    return f"not ({' or '.join(terms)})" if terms else ""


def build_filter(vsensor_address: str | None, ports: Iterable[int],
                 nets: Iterable[IPNetwork]) -> FilterResult:
    """Compile and check the expression; fall back to the self part alone when needed."""
    own = self_expression(vsensor_address, ports) if vsensor_address else ""
    peers = peers_expression(nets)
    full = " and ".join(p for p in (own, peers) if p)
    if not peers:
        return FilterResult(full, False)
    try:
        compile_filter(full).check_kernel_limit()
    except FilterError as exc:
        return FilterResult(own, True, str(exc))
    return FilterResult(full, False)
