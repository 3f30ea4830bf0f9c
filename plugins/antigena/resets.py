"""The built-in enforcer: reset both ends of a blocked TCP connection with exact sequence numbers.

Linux (RFC 5961) honours a reset only when its sequence number is exactly the next one it
expects; anything else in the window draws a "challenge ACK", which the watch sees in turn and
answers with an exact reset. So every segment seen yields two resets, computed from it:

* to the segment's receiver: ``seq`` = the segment's sequence + its length (SYN and FIN count
  one), ``ack`` = the segment's ack;
* to the segment's sender: ``seq`` = the segment's ack (what the sender expects next), ``ack`` =
  the receiver's next sequence. A bare SYN (a sender in SYN-SENT) gets a RST+ACK that
  acknowledges it, which is what SYN-SENT accepts.

A remote end's reset leaves by the interface on which the segment was seen (AF_PACKET, the
Ethernet header taken from the segment, swapped when it goes back to the sender); a frame sent
out of an interface never comes back into this host, so an end that has an address here gets its
reset through a raw IP socket instead. ``craft`` builds the packets (struct and a checksum; no
packet library is imported).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.pipeline.contracts import ResponseEnforcer
from ossensor_core.runtime.logsetup import level

from .actions import (TCP_ACK, TCP_RST, TCP_SYN, Action, Segment, first_match,
                      parse_ethernet, parse_proc_tcp)
from .craft import ether_frame, tcp_segment

log = logging.getLogger("ossensor_plugins.antigena")

LOCAL_REFRESH_SECONDS = 5.0


class TokenBucket:
    """At most ``rate`` events a second on average, bursts of up to ``rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self, count: int = 1) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


def established_connections() -> list[tuple]:
    """This host's established TCP connections, from ``/proc/net/tcp`` and ``tcp6``."""
    found: list[tuple] = []
    for version, path in ((4, "/proc/net/tcp"), (6, "/proc/net/tcp6")):
        try:
            with open(path) as table:
                found += parse_proc_tcp(table.read(), version)
        except OSError:
            continue
    return found


def is_host_address(address: str) -> bool:
    """Whether ``address`` belongs to this host (network namespace): only then can a socket
    bind to it (``ip_nonlocal_bind`` aside). Synchronous and cheap, unlike a netlink dump."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


class ResetEnforcer(ResponseEnforcer):
    """Sends TCP resets for the segments of blocked connections (``name = "reset"``)."""

    name = "reset"

    def __init__(self, resets_per_second: float,
                 is_local: Callable[[str], bool] = is_host_address) -> None:
        self.bucket = TokenBucket(resets_per_second)
        self._is_local = is_local
        self._local: dict[str, tuple[bool, float]] = {}
        self._sockets: dict[int, socket.socket] = {}
        self.resets: Counter[str] = Counter()  # by action id, taken by the reports
        self.resets_sent = 0  # since the start, for the metrics
        self.probes_sent = 0
        self.rate_limited = 0

    def is_local(self, address: str) -> bool:
        """Cached for a few seconds: addresses come and go, but not per segment."""
        now = time.monotonic()
        known = self._local.get(address)
        if known is None or now - known[1] > LOCAL_REFRESH_SECONDS:
            if len(self._local) > 4096:
                self._local.clear()
            known = self._local[address] = (self._is_local(address), now)
        return known[0]

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            if family == socket.AF_PACKET:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # sends only
            else:
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._sockets[family] = sock
        return sock

    def enforce(self, batch: PacketBatch, actions: Sequence[object]) -> int:
        blocked = [a for a in actions if isinstance(a, Action)]
        acted = 0
        now = time.time()
        for packet in batch.packets():
            segment = parse_ethernet(packet.data)
            if segment is None or segment.flags & TCP_RST:
                continue
            action = first_match(blocked, segment, now) if blocked else None
            if action is None:
                continue
            if not self.bucket.take(2):
                self.rate_limited += 1
                continue
            sent = self.reset_both(segment, batch.interface)
            if sent:
                acted += 1
                self.resets[action.id] += sent
        return acted

    def reset_both(self, segment: Segment, interface: str) -> int:
        """Reset the segment's receiver and its sender; returns how many resets went out."""
        has_ack = bool(segment.flags & TCP_ACK)
        bare_syn = segment.flags & TCP_SYN and not has_ack
        (sender, sport), (receiver, dport) = segment.endpoints()
        sent = 0
        # To the receiver, as if from the sender.
        sent += self._send(receiver, segment, interface, towards_sender=False,
                           tcp=(sport, dport, TCP_RST | TCP_ACK if has_ack else TCP_RST,
                                segment.next_seq, segment.ack if has_ack else 0))
        # To the sender, as if from the receiver.
        sent += self._send(sender, segment, interface, towards_sender=True,
                           tcp=(dport, sport, TCP_RST | TCP_ACK,
                                0 if bare_syn else segment.ack, segment.next_seq))
        self.resets_sent += sent
        if log.isEnabledFor(level(3)):
            log.log(level(3), "Antigena: reset %s:%d <-> %s:%d (seen on %s, seq %d ack %d, "
                    "%d bytes, flags 0x%02x): %d resets", sender, sport, receiver, dport,
                    interface, segment.seq, segment.ack, segment.payload, segment.flags, sent)
        return sent

    def _send(self, target: str, segment: Segment, interface: str, towards_sender: bool,
              tcp: tuple[int, int, int, int, int]) -> int:
        """One reset to ``target``; ``tcp``: source port, destination port, flags, seq, ack."""
        source = str(segment.dst if towards_sender else segment.src)
        packet = tcp_segment(source, target, *tcp)
        try:
            if self.is_local(target):
                family = socket.AF_INET6 if ":" in target else socket.AF_INET
                self._socket(family).sendto(packet, (target, 0))
            else:
                # Back to the sender: the seen frame's addresses swapped; onwards: as seen.
                dst_mac, src_mac = ((segment.eth_src, segment.eth_dst) if towards_sender
                                    else (segment.eth_dst, segment.eth_src))
                self._socket(socket.AF_PACKET).sendto(ether_frame(dst_mac, src_mac, packet),
                                                      (interface, 0))
        except OSError as exc:
            log.warning("Antigena: cannot send a reset to %s via %s: %s", target,
                        "the local stack" if self.is_local(target) else interface, exc)
            return 0
        return 1

    def probe_idle(self, actions: Sequence[Action],
                   spared: Collection[tuple[str, int]] = ()) -> int:
        """Make the idle blocked connections of this host show their sequence numbers.

        A connection that sends nothing is never seen, so never reset. For each established
        connection of this host that an action blocks, the local end gets an ACK "from" the
        remote end with a sequence number far outside its window; Linux answers such a segment
        with an ACK that carries its exact numbers, which the watch then sees and resets.
        Returns how many probes went out.
        """
        sent = 0
        for local, lport, remote, rport in established_connections():
            if (str(local), lport) in spared or (str(remote), rport) in spared or \
                    not any(a.matches_ends(local, lport, remote, rport) for a in actions):
                continue
            if not self.bucket.take(1):
                break
            # Half the sequence space away from anything recent: outside any window.
            seq = (int(time.monotonic() * 1e6) + 0x7FFFFFFF) & 0xFFFFFFFF
            packet = tcp_segment(str(remote), str(local), rport, lport, TCP_ACK, seq, seq)
            family = socket.AF_INET if local.version == 4 else socket.AF_INET6
            try:
                self._socket(family).sendto(packet, (str(local), 0))
            except OSError as exc:
                log.warning("Antigena: cannot probe %s:%d: %s", local, lport, exc)
                continue
            sent += 1
            self.probes_sent += 1
            log.log(level(3), "Antigena: probed idle connection %s:%d <-> %s:%d", local, lport,
                    remote, rport)
        return sent

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
