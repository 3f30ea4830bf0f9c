"""The filter the vSensor hands each sensor (ANDed by the sensor with its own BPF).

Two parts:

* ``not (host <vSensor address> and tcp port <ports>)``: the sensor's own uploads. Always a
  libpcap expression (short, and readable in logs and on the status page). It reads addresses
  and ports a cut frame may not have, and a classic BPF load past the end of a frame rejects
  the frame; it is not wrapped here (``(len < N) or (...)``) because ``len`` counts the link
  header and the sensor's link types are not known here: N would be right for one link type
  only. The sensor compiles it alone and adds a length check before each of its loads
  (``ossensor_core/capture/bounded.py``), so a frame too short for it is kept (its own ``BPF``
  still decides). Older sensors compile it with their ``BPF`` in one program, as before.
* The peer exclusion, so that traffic between two registered sensors is stored exactly once.
  Each sensor *claims* its addresses and the workload ranges behind it (pod CIDRs). The rule,
  per flow: a packet belongs to the sensor that claims the **lower** of its two addresses
  (compared as unsigned numbers); every other sensor drops it. Both directions of a flow have
  the same lower address, so a TCP connection is stored whole by one sensor (Zeek sees both
  halves). A sensor therefore drops a packet when its lower address lies in ``peers``: the
  ranges claimed by exactly one *other* sensor. Ranges claimed by several sensors (``172.17.0.1``
  on every Docker host, overlapping pod CIDRs) belong to nobody and are never dropped:
  duplicates are better than a gap. Loopback, link-local, multicast and unspecified addresses
  are never claimed.

The rule is monotonic: a sensor that registers only adds drops to its peers for traffic that it
itself keeps from the moment it starts, so a sensor joining (or a peer learning of it a
heartbeat later) causes duplicates for a few seconds, never a loss.

Sensors that offer the ``peer-ranges`` feature receive the peer set as sorted ranges and
generate classic BPF for it themselves (:mod:`ossensor_core.capture.peer_exclusion`, a binary search: 5,000
nodes fit). Older sensors get the same rule as a libpcap expression (:func:`legacy_filter`),
left out when it would not fit the kernel's limit (duplicates rather than a blind sensor);
compiling it takes seconds for hundreds of networks, so it runs in a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ossensor_core.capture.bpf import compile_filter
from ossensor_core.capture.peer_exclusion import AddressSet, Interval, parse_range
from ossensor_core.errors import FilterError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Registration feature: the sensor generates BPF from ``peer_ranges`` itself.
FEATURE_PEER_RANGES = "peer-ranges"
#: Networks beyond this are not even tried as a libpcap expression (it would take minutes).
LEGACY_MAX_NETWORKS = 300


@dataclass(frozen=True)
class FilterResult:
    expression: str
    peers_dropped: bool  # the peer part was left out (too long, or it did not compile)
    reason: str = ""


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address; an IPv6 zone (``fe80::1%eth0``) is dropped. Raises ValueError."""
    return ipaddress.ip_address(str(text).split("%", 1)[0].strip())


def _usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified)


def claimed_set(addresses: Iterable[str], workloads: Iterable[str] = ()) -> AddressSet:
    """What one sensor claims: its usable addresses and its workload ranges (ValueError names
    a bad entry)."""
    v4: list[Interval] = []
    v6: list[Interval] = []
    for text in addresses:
        address = parse_address(text)
        if _usable(address):
            (v4 if address.version == 4 else v6).append((int(address), int(address)))
    for text in workloads:
        first, last = parse_range(text)
        if _usable(first) and _usable(last):
            (v4 if first.version == 4 else v6).append((int(first), int(last)))
    return AddressSet(v4, v6)


def claimed_once(claims: Iterable[AddressSet]) -> AddressSet:
    """The addresses claimed by exactly one sensor (a sweep over every sensor's intervals)."""
    result: dict[int, list[Interval]] = {4: [], 6: []}
    claims = list(claims)
    for version in (4, 6):
        events: list[tuple[int, int]] = []
        for claim in claims:
            for first, last in (claim.v4 if version == 4 else claim.v6):
                events += [(first, 1), (last + 1, -1)]
        events.sort()
        depth, start = 0, 0
        for point, delta in events:
            if depth == 1 and point > start:
                result[version].append((start, point - 1))
            depth += delta
            start = point
    return AddressSet(result[4], result[6])


def subtract(whole: AddressSet, part: AddressSet) -> AddressSet:
    """``whole`` without the addresses of ``part``."""
    def cut(intervals: Sequence[Interval], holes: Sequence[Interval]) -> list[Interval]:
        out: list[Interval] = []
        j = 0
        for first, last in intervals:
            while j < len(holes) and holes[j][1] < first:
                j += 1
            k = j
            while first <= last and k < len(holes) and holes[k][0] <= last:
                if holes[k][0] > first:
                    out.append((first, holes[k][0] - 1))
                first = max(first, holes[k][1] + 1)
                k += 1
            if first <= last:
                out.append((first, last))
        return out
    return AddressSet(cut(whole.v4, part.v4), cut(whole.v6, part.v6))


def peer_set(own: AddressSet, everyone_once: AddressSet) -> AddressSet:
    """The ranges one sensor drops (as the lower address): claimed once, and not by itself."""
    return subtract(everyone_once, own)


def self_expression(vsensor_address: str, ports: Iterable[int]) -> str:
    ports = sorted(set(ports))
    port_part = " or ".join(f"tcp port {p}" for p in ports)
    if len(ports) > 1:
        port_part = f"({port_part})"
    return f"not (host {parse_address(vsensor_address)} and {port_part})"


def _networks(peers: AddressSet) -> list[IPNetwork]:
    nets: list[IPNetwork] = []
    for make, intervals in ((ipaddress.IPv4Address, peers.v4), (ipaddress.IPv6Address, peers.v6)):
        for first, last in intervals:
            nets += ipaddress.summarize_address_range(make(first), make(last))
    return nets


def _src_lower(proto: str, src: int, dst: int, words: int) -> str:
    """libpcap: the source address <= the destination address, word by word (unsigned)."""
    def word(offset: int, i: int) -> str:
        return f"{proto}[{offset + 4 * i}:4]"
    text = f"{word(src, words - 1)} <= {word(dst, words - 1)}"
    for i in reversed(range(words - 1)):
        text = (f"({word(src, i)} < {word(dst, i)} or ({word(src, i)} = {word(dst, i)} "
                f"and {text}))")
    return text


def peers_expression(peers: AddressSet | Iterable[IPNetwork]) -> str:
    """The lower-address rule as a libpcap expression ("" for no peers)."""
    nets = _networks(peers) if isinstance(peers, AddressSet) else list(peers)
    terms = []
    for version, proto, src, dst, words in ((4, "ip", 12, 16, 1), (6, "ip6", 8, 24, 4)):
        family = [n for n in nets if n.version == version]
        if not family:
            continue
        srcs = " or ".join(f"src net {n}" for n in family)
        dsts = " or ".join(f"dst net {n}" for n in family)
        lower = _src_lower(proto, src, dst, words)
        terms.append(f"(({srcs}) and {lower}) or (({dsts}) and not {lower})")
    return f"not ({' or '.join(terms)})" if terms else ""


def build_filter(own: str, peers: AddressSet | Iterable[IPNetwork]) -> FilterResult:
    """The whole filter as a libpcap expression, for sensors without ``peer-ranges``: ``own``
    (the sensors' traffic to the vSensor, :func:`self_expression`) and the peer part, compiled
    and checked; ``own`` alone when the peer part does not fit."""
    nets = _networks(peers) if isinstance(peers, AddressSet) else list(peers)
    if not nets:
        return FilterResult(own, False)
    if len(nets) > LEGACY_MAX_NETWORKS:
        return FilterResult(own, True, f"{len(nets)} peer networks are more than a libpcap "
                                       f"expression can hold within the kernel's limit of 4096 "
                                       f"instructions (at most {LEGACY_MAX_NETWORKS} tried)")
    full = " and ".join(p for p in (own, peers_expression(nets)) if p)
    try:
        compile_filter(full).check_kernel_limit()
    except FilterError as exc:
        return FilterResult(own, True, str(exc))
    return FilterResult(full, False)
