"""Classic BPF generated directly for the vSensor's peer exclusion, prepended to libpcap's program.

Why not a libpcap expression: a flat list of hosts compiles in seconds and stops fitting the
kernel's 4096 instructions near 750 hosts (``measured.md``); a cluster has thousands of nodes.
Here the excluded addresses are sorted, merged intervals (:class:`AddressSet`) and the program is
a binary search over them, generated in milliseconds: about two instructions per IPv4 interval;
IPv6 is searched one 32-bit word at a time, the next word loaded only inside the cells that an
interval edge cuts, so addresses sharing a /64 cost about four instructions each.

The rule it implements (``docs/protocol.md``, "Filters"): a packet is dropped when the *lower*
of its two addresses (source and destination compared as unsigned numbers) lies in the peer set,
that is, belongs to another registered sensor; that sensor stores it. Both directions of a flow
have the same lower address, so a flow is stored whole by one sensor.

Layout of the generated part (``X`` holds the offset of the IP header, then of the lower
address)::

    link-layer dispatch (Ethernet, also with one 802.1Q/802.1ad tag left in the data; raw IP)
    IPv4: A = min(src, dst); binary search on A          -> ret #0 (drop) or keep
    IPv6: X = offset of min(src, dst) (128-bit compare); search word by word on [x+0..x+12]
    keep: ja to the first instruction of the user's (libpcap) program, appended after us

Non-IP frames, frames cut before the end of a header it reads (the link header, VLAN tag,
EtherType, the fixed IP header with both addresses) and IP headers of the wrong version (or an
IPv4 header length under 20 bytes) always reach the user's program: a classic BPF load past
the end of a packet rejects the packet, so every load is preceded by a length check.

Conditional jumps reach 255 instructions at most, so the search tree is cut into regions, each
ending with its own pair of exits (``ret #0`` and a long ``ja`` to the user's program), and far
subtrees are reached with ``ja``. Only forward jumps are emitted, as the kernel requires.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ossensor_core.capture.bpf import BPF_MAXINSNS, BpfProgram
from ossensor_core.capture.bpfasm import (ALU_ADD_K, ALU_AND_K, ALU_SUB_X, JA, JEQ_K, JEQ_X, JGE_K,
                                           JGT_K, JGT_X, LD_B_ABS, LD_B_IND, LD_H_ABS, LD_MEM, LD_W_IND, LD_W_LEN,
                                           LDX_IMM, LDX_MEM, RET_K, ST, TAX, TXA, Asm)
from ossensor_core.capture.headers import ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6
from ossensor_core.wire.names import LINKTYPE_ETHERNET, LINKTYPE_RAW
from ossensor_core.errors import FilterError

Interval = tuple[int, int]  # first and last address, inclusive

_REGION = 200  # largest size of a search region with local exits (jumps reach 255)
_WORD = (1 << 32) - 1


class AddressSet:
    """Disjoint, sorted IPv4 and IPv6 intervals; parsed from and shown as short text."""

    def __init__(self, v4: Iterable[Interval] = (), v6: Iterable[Interval] = ()) -> None:
        self.v4: tuple[Interval, ...] = _merge(v4)
        self.v6: tuple[Interval, ...] = _merge(v6)
        self._starts4 = [a for a, _ in self.v4]
        self._starts6 = [a for a, _ in self.v6]

    @classmethod
    def parse(cls, texts: Iterable[str]) -> AddressSet:
        """From ``"192.0.2.0/24"``, ``"192.0.2.7"`` or ``"192.0.2.9-192.0.2.20"``; ValueError
        names a bad entry."""
        v4: list[Interval] = []
        v6: list[Interval] = []
        for text in texts:
            first, last = parse_range(str(text))
            (v4 if first.version == 4 else v6).append((int(first), int(last)))
        return cls(v4, v6)

    @classmethod
    def of_networks(cls, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
                    ) -> AddressSet:
        nets = list(networks)
        return cls([(int(n[0]), int(n[-1])) for n in nets if n.version == 4],
                   [(int(n[0]), int(n[-1])) for n in nets if n.version == 6])

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressSet) and (self.v4, self.v6) == (other.v4, other.v6)

    def __hash__(self) -> int:
        return hash((self.v4, self.v6))

    def __contains__(self, address: object) -> bool:
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        intervals, starts = (self.v4, self._starts4) if addr.version == 4 else \
            (self.v6, self._starts6)
        i = bisect.bisect_right(starts, int(addr)) - 1
        return i >= 0 and intervals[i][1] >= int(addr)

    def texts(self) -> list[str]:
        """Each interval as a CIDR when it is one, else ``first-last``."""
        out: list[str] = []
        for version, intervals in ((4, self.v4), (6, self.v6)):
            make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for first, last in intervals:
                size = last - first + 1
                if size & (size - 1) == 0 and first % size == 0:
                    bits = 32 if version == 4 else 128
                    prefix = bits - size.bit_length() + 1
                    out.append(str(make(first)) if prefix == bits else f"{make(first)}/{prefix}")
                else:
                    out.append(f"{make(first)}-{make(last)}")
        return out

    def digest(self) -> str:
        """A short stable id: sensors echo it so that unchanged sets are not sent again."""
        return hashlib.sha256(",".join(self.texts()).encode()).hexdigest()[:16]

    def summary(self) -> str:
        return f"{len(self.v4)} IPv4 and {len(self.v6)} IPv6 ranges"

    def __repr__(self) -> str:
        return f"AddressSet({self.summary()}, id {self.digest()})"


def parse_range(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                    ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """First and last address of ``a/n``, ``a`` or ``a-b``. Raises ValueError."""
    text = text.strip()
    if "-" in text:
        first_text, last_text = text.split("-", 1)
        first = ipaddress.ip_address(first_text.strip())
        last = ipaddress.ip_address(last_text.strip())
        if first.version != last.version or last < first:
            raise ValueError(f"bad address range {text!r}")
        return first, last
    network = ipaddress.ip_network(text, strict=False)
    return network[0], network[-1]


def _merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    merged: list[list[int]] = []
    for first, last in sorted(intervals):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple((a, b) for a, b in merged)


# -- the search over intervals -------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """Values ``first..last`` of the word in A that decide: drop, or (``sub``) go on with the
    next word at the label ``sub``; a small next step (``inline``: the word to load and its
    spans, none deeper) is placed in the region itself instead."""

    first: int
    last: int
    sub: str | None = None
    inline: tuple[int, tuple[_Span, ...]] | None = None

    @property
    def size(self) -> int:
        """About how many instructions it takes in a region."""
        return 3 + (1 + 3 * len(self.inline[1]) if self.inline else 1 if self.sub else 0)


class _Search:
    """Binary searches over 32-bit words in A, cut into regions whose conditional jumps all
    reach their targets (see the module docstring)."""

    def __init__(self, asm: Asm, keep: str) -> None:
        self.asm = asm
        self.keep = keep  # the global label of the user's program

    def emit(self, spans: Sequence[_Span]) -> None:
        self._tree(list(spans), 0, _WORD)

    def _tree(self, spans: list[_Span], low: int, high: int) -> None:
        """Code that ends at drop, keep or a deeper search for every A in [low, high]."""
        asm = self.asm
        if sum(s.size for s in spans) + 2 <= _REGION:
            drop, keep = asm.new("D"), asm.new("K")
            jumps = {s.sub: asm.new("J") for s in spans if s.sub}
            self._plain(spans, low, high, drop, keep, jumps)
            # The region's own exits, near enough for every conditional jump above.
            for span in spans:
                if span.sub is None:
                    continue
                asm.mark(jumps[span.sub])
                if span.inline is None:
                    asm.op(JA, span.sub)
                else:
                    level, inner = span.inline
                    asm.op(LD_W_IND, 4 * level)
                    self._plain(list(inner), 0, _WORD, drop, keep, {})
            if drop in asm.used:
                asm.mark(drop)
                asm.op(RET_K, 0)
            if keep in asm.used:
                asm.mark(keep)
                asm.op(JA, self.keep)
            return
        mid = len(spans) // 2
        pivot = spans[mid].first
        right = asm.new("R")
        asm.op(JGE_K, pivot, 0, 1)
        asm.op(JA, right)
        self._tree(spans[:mid], low, pivot - 1)
        asm.mark(right)
        self._tree(spans[mid:], pivot, high)

    def _plain(self, spans: list[_Span], low: int, high: int, drop: str, keep: str,
               jumps: dict[str, str]) -> None:
        asm = self.asm
        if not spans:
            asm.op(JA, keep)
            return
        if len(spans) == 1:
            span = spans[0]
            target = jumps[span.sub] if span.sub else drop
            if span.first == span.last and low < span.first and span.last < high:
                asm.op(JEQ_K, span.first, target, keep)
                return
            if span.first > low:
                inside = asm.new("I")
                asm.op(JGE_K, span.first, inside, keep)
                asm.mark(inside)
            if span.last < high:
                asm.op(JGE_K, span.last + 1, keep, target)
            else:
                asm.op(JA, target)
            return
        mid = len(spans) // 2
        pivot = spans[mid].first
        ge = asm.new("G")
        asm.op(JGE_K, pivot, ge, 0)
        self._plain(spans[:mid], low, pivot - 1, drop, keep, jumps)
        asm.mark(ge)
        self._plain(spans[mid:], pivot, high, drop, keep, jumps)


def _word_spans(intervals: Sequence[Interval], level: int, base: int, asm: Asm,
                later: list[tuple[str, list[Interval], int, int]]) -> list[_Span]:
    """IPv6 as four 32-bit words: the spans of word ``level`` for intervals that lie in the
    cell ``base`` (the words before ``level`` fixed). A word value whose cell the intervals
    only partly cover continues at the next word (queued in ``later``)."""
    shift = 32 * (3 - level)
    cell = 1 << shift
    full: list[tuple[int, int]] = []
    partial: dict[int, list[Interval]] = {}
    for first, last in intervals:
        a, b = (first - base) >> shift, (last - base) >> shift
        lo, hi = a, b
        if first != base + a * cell:  # starts inside its cell
            partial.setdefault(a, []).append((first, min(last, base + (a + 1) * cell - 1)))
            lo = a + 1
        if last != base + (b + 1) * cell - 1 and (b != a or lo == a):  # ends inside its cell
            partial.setdefault(b, []).append((max(first, base + b * cell), last))
            hi = b - 1
        if lo <= hi:
            if full and full[-1][1] + 1 == lo:
                full[-1] = (full[-1][0], hi)
            else:
                full.append((lo, hi))
    spans = [_Span(lo, hi) for lo, hi in full]
    for value, parts in partial.items():
        label = asm.new("W")
        deeper: list[tuple[str, list[Interval], int, int]] = []
        inner = _word_spans(parts, level + 1, base + value * cell, asm, deeper)
        if len(inner) <= 2 and all(s.sub is None for s in inner):  # one more word decides
            spans.append(_Span(value, value, label, (level + 1, tuple(inner))))
        else:
            later.append((label, parts, level + 1, base + value * cell))
            spans.append(_Span(value, value, label))
    return sorted(spans, key=lambda s: s.first)


def _emit_ipv6(asm: Asm, intervals: Sequence[Interval], keep: str) -> None:
    """The search over the lower address at ``[x+0..x+12]``, one word at a time: A holds one
    word, and the next word is loaded only where the intervals' edges need it."""
    later: list[tuple[str, list[Interval], int, int]] = []
    pending = [("", list(intervals), 0, 0)]
    while pending:
        label, parts, level, base = pending.pop(0)
        if label:
            asm.mark(label)
        asm.op(LD_W_IND, 4 * level)
        _Search(asm, keep).emit(_word_spans(parts, level, base, asm, later))
        pending += later
        later.clear()


# -- the whole generated part --------------------------------------------------------------------

#: The link types a sensor captures (``bpf.ARPHRD_TO_LINKTYPE``); others get no peer part.
SUPPORTED_LINKTYPES = (LINKTYPE_ETHERNET, LINKTYPE_RAW)


def exclusion_code(peers: AddressSet, linktype: int) -> list[tuple[int, int, int, int]]:
    """The generated part alone: drops (``ret #0``) what the rule excludes, and jumps past its
    own end for everything else (where the user's program goes). FilterError for a link type
    it does not know."""
    asm = Asm()
    end = "END"
    out = asm.new("OUT")  # a near "ja END" for the dispatch's conditional jumps
    ip4, ip6 = asm.new("IP4_"), asm.new("IP6_")
    bases: list[tuple[str, str, int]] = []  # (label, family entry, offset of the IP header)

    def ethertype(offset: int, base: int, tagged: str | None) -> None:
        e4, e6 = asm.new("E4_"), asm.new("E6_")
        asm.op(LD_W_LEN)  # a frame cut before its EtherType is never dropped here
        asm.op(JGE_K, offset + 2, 0, out)
        asm.op(LD_H_ABS, offset)
        asm.op(JEQ_K, ETH_P_IP, e4, 0)
        if tagged is None:
            asm.op(JEQ_K, ETH_P_IPV6, e6, out)
        else:
            asm.op(JEQ_K, ETH_P_IPV6, e6, 0)
            asm.op(JEQ_K, ETH_P_8021Q, tagged, 0)
            asm.op(JEQ_K, ETH_P_8021AD, tagged, out)
        bases.extend([(e4, ip4, base), (e6, ip6, base)])

    if linktype == LINKTYPE_ETHERNET:
        tag = asm.new("TAG")
        ethertype(12, 14, tag)
        asm.mark(tag)
        ethertype(16, 18, None)
    elif linktype == LINKTYPE_RAW:
        r4, r6 = asm.new("R4_"), asm.new("R6_")
        asm.op(LD_W_LEN)
        asm.op(JGE_K, 1, 0, out)
        asm.op(LD_B_ABS, 0)
        asm.op(ALU_AND_K, 0xF0)
        asm.op(JEQ_K, 0x40, r4, 0)
        asm.op(JEQ_K, 0x60, r6, out)
        bases.extend([(r4, ip4, 0), (r6, ip6, 0)])
    else:
        raise FilterError(f"no generated peer exclusion for link type {linktype} (only for "
                          f"{', '.join(map(str, SUPPORTED_LINKTYPES))})")
    for label, entry, base in bases:
        asm.mark(label)
        asm.op(LDX_IMM, base)
        asm.op(JA, entry)
    asm.mark(out)
    asm.op(JA, end)

    # Both families: the fixed header must be there and well formed (version 4 with a header
    # length of at least 20 bytes, or version 6), else the user's program decides: a truncated
    # or malformed frame is never dropped here. Then A or X is set to the lower address.
    for label, version, search in ((ip4, 4, peers.v4), (ip6, 6, peers.v6)):
        asm.mark(label)
        if not search:
            asm.op(JA, end)
            continue
        keep, whole = asm.new("KH"), asm.new("WH")
        asm.op(LD_W_LEN)
        asm.op(ALU_SUB_X)  # len >= X: the dispatch loaded the bytes just before X
        asm.op(JGE_K, 20 if version == 4 else 40, 0, keep)
        asm.op(LD_B_IND, 0)
        if version == 4:
            asm.op(JGE_K, 0x45, 0, keep)
            asm.op(JGT_K, 0x4F, keep, whole)
        else:
            asm.op(ALU_AND_K, 0xF0)
            asm.op(JEQ_K, 0x60, whole, keep)
        asm.mark(keep)
        asm.op(JA, end)
        asm.mark(whole)
        if version == 4:
            asm.op(LD_W_IND, 12)
            asm.op(ST, 0)
            asm.op(LD_W_IND, 16)
            asm.op(LDX_MEM, 0)
            asm.op(JGT_X, 0, 0, 1)  # dst > src: the lower one is src (in X)
            asm.op(TXA)
        else:
            src_low, dst_low, tree = asm.new("SL"), asm.new("DL"), asm.new("T6_")
            asm.op(TXA)
            asm.op(ST, 2)
            for i in range(4):
                asm.op(LDX_MEM, 2)
                asm.op(LD_W_IND, 8 + 4 * i)
                asm.op(ST, 0)
                asm.op(LD_W_IND, 24 + 4 * i)
                asm.op(LDX_MEM, 0)
                nxt = asm.new("W")
                asm.op(JGT_X, 0, src_low, 0)
                asm.op(JEQ_X, 0, nxt if i < 3 else src_low, dst_low)
                asm.mark(nxt)
            asm.mark(src_low)
            asm.op(LD_MEM, 2)
            asm.op(ALU_ADD_K, 8)
            asm.op(TAX)
            asm.op(JA, tree)
            asm.mark(dst_low)
            asm.op(LD_MEM, 2)
            asm.op(ALU_ADD_K, 24)
            asm.op(TAX)
            asm.mark(tree)
        if version == 4:
            _Search(asm, end).emit([_Span(a, b) for a, b in search])
        else:
            _emit_ipv6(asm, search, end)
    return asm.resolve(end)


@lru_cache(maxsize=32)
def _cached_code(peers: AddressSet, linktype: int) -> tuple[tuple[int, int, int, int], ...]:
    return tuple(exclusion_code(peers, linktype))


def with_exclusion(peers: AddressSet, user: BpfProgram) -> BpfProgram:
    """The generated part followed by ``user`` (libpcap's program, unchanged: its jumps are
    relative). Raises FilterError when the link type is unknown or the whole exceeds the
    kernel's limit; the caller then falls back to ``user`` alone."""
    if not len(peers):
        return user
    code = _cached_code(peers, user.linktype)
    total = len(code) + len(user)
    if total > BPF_MAXINSNS:
        raise FilterError(f"peer exclusion ({peers.summary()}) takes {len(code)} BPF "
                          f"instructions, with the rest of the filter ({len(user)}) {total}: more "
                          f"than the kernel's limit of {BPF_MAXINSNS}")
    expression = f"(not lower address in peers [{peers.summary()}, id {peers.digest()}])"
    if user.expression:
        expression += f" and ({user.expression})"
    return BpfProgram(expression, user.linktype, code + user.instructions)


def fit_exclusion(peers: AddressSet, user: BpfProgram) -> tuple[BpfProgram, str]:
    """:func:`with_exclusion`, or when that does not fit, the same with one address family's
    peers left out (the costlier first), or ``user`` alone: never a blind sensor. Leaving peers
    out only makes this sensor keep more (duplicates). Returns the program and a note saying
    what was left out and why ("" when nothing was)."""
    try:
        return with_exclusion(peers, user), ""
    except FilterError as exc:
        reason = str(exc)
    families = [(AddressSet(peers.v4), "IPv6"), (AddressSet((), peers.v6), "IPv4")]
    families.sort(key=lambda f: -len(f[0]))  # keep the family with more ranges if it fits
    for part, left_out in families:
        if not len(part):
            continue
        try:
            return (with_exclusion(part, user),
                    f"the {left_out} peer ranges are left out: {reason}")
        except FilterError:
            continue
    return user, f"the peer exclusion is left out: {reason}"


def lower_address_excluded(peers: AddressSet, src: str, dst: str) -> bool:
    """The rule, in Python: what the generated program drops (tests and documentation)."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return min(a, b) in peers
