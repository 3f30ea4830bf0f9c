"""Antigena's messages as both ends hold them: the block action the vSensor issues and the
sensor enforces, and the counts a sensor reports for it (``docs/antigena.md``). The sensor's
matching of segments lives in ``plugins/antigena``; the vSensor's bookkeeping in
``ossensor_vsensor.antigena``. Pure: no I/O."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .names import valid_sensor_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Actions in force for one sensor at once (the vSensor answers ``409 too_many_actions`` beyond,
#: the sensor rejects the rest). The sensor's watch filter must always fit the kernel's 4,096
#: classic BPF instructions: the worst action (IPv6 /127 source and destination, both ports)
#: costs 66 instructions, so 63 fit and 64 do not (4,171); 40 compile to at most 2,587, with
#: up to 32 exempt vSensor endpoints, leaving over a third of the limit as margin for other
#: libpcap versions (``docs/antigena.md``).
MAX_ACTIONS_IN_FORCE = 40
#: vSensor endpoints (address, port) a sensor keeps out of its watch filter; beyond, the filter
#: could outgrow the kernel's limit (each costs about 13 instructions).
MAX_EXEMPT_ENDPOINTS = 32
#: The longest an action holds, and the furthest ahead its start may be.
MAX_DURATION_SECONDS = 30 * 86400
#: How far the two clocks may disagree when a sensor checks an action's times.
TIME_SLACK_SECONDS = 3600


def parse_network(name: str, value: object) -> IPNetwork | None:
    """A plain network (``192.0.2.7``, ``198.51.100.0/24``, ``2001:db8::/32``) or None;
    ValueError for anything else: scope ids (``fe80::1%eth0``), host bits, stray text."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"{name} {str(value)[:64]!r} is not an address or CIDR")
    if "%" in value:
        raise ValueError(f"{name} {value!r} has a scope id (%...): give a plain address or "
                         "network")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        if "host bits" in str(exc):
            network = ipaddress.ip_network(value.strip(), strict=False)
            raise ValueError(f"{name} {value!r} has host bits set (the network is "
                             f"{network})") from None
        raise ValueError(f"{name} {value!r} is not an address or CIDR") from None


def check_times(start: object, expiry: object, now: float, slack: float = 0.0) -> None:
    """Start and expiry are finite Unix times, ``start < expiry``, at most
    :data:`MAX_DURATION_SECONDS` apart, neither further ahead of ``now`` than that (plus
    ``slack`` for a clock difference). ValueError says what is wrong."""
    for name, value in (("start", start), ("expiry", expiry)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} {str(value)[:32]} is not a finite Unix time")
    # Figures in messages with %g: 1e308 stays short.
    assert isinstance(start, (int, float)) and isinstance(expiry, (int, float))
    if expiry <= start:
        raise ValueError(f"expiry {expiry:.13g} is not after start {start:.13g}")
    if expiry - start > MAX_DURATION_SECONDS + slack:
        raise ValueError(f"the action would hold {expiry - start:.6g} s, longer than "
                         f"{MAX_DURATION_SECONDS} s (30 days)")
    if start > now + MAX_DURATION_SECONDS + slack:
        raise ValueError(f"start {start:.13g} is more than 30 days ahead")


def _port(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        shown = value if isinstance(value, int) else repr(str(value)[:32])
        raise ValueError(f"{name} {shown} is not a port (1-65535)")
    return value


@dataclass(frozen=True)
class BlockAction:
    """Block TCP connections between ``src`` and ``dst`` (None: any), optionally from ``sport``
    and to ``dport``, in either direction, from ``start`` until ``expiry`` (Unix time); for
    ``sensor`` only, or for every sensor (None)."""

    id: str
    src: IPNetwork | None
    dst: IPNetwork | None
    sport: int | None
    dport: int | None
    start: float
    expiry: float
    sensor: str | None = None

    @classmethod
    def from_json(cls, message: object, now: float, slack: float = TIME_SLACK_SECONDS,
                  targeted: bool = False) -> BlockAction:
        """An action as :meth:`as_json` writes it (the vSensor's message to a sensor, the
        vSensor's own file of actions in force); ValueError says what is wrong. The target
        ``sensor`` is read only when ``targeted`` (a sensor enforces what it is sent)."""
        if not isinstance(message, dict):
            raise ValueError("an action must be a JSON object")
        action_id = message.get("id")
        if not isinstance(action_id, str) or not 0 < len(action_id) <= 100:
            raise ValueError(f"bad action id {str(action_id)[:100]!r}")
        kind = message.get("kind", "block")
        if kind != "block":
            raise ValueError(f"unknown kind of action {str(kind)[:32]!r} (known: block)")
        if message.get("protocol", "tcp") != "tcp":
            raise ValueError(f"protocol {str(message.get('protocol'))[:32]!r} cannot be "
                             "blocked (only tcp)")
        src, dst = parse_network("src", message.get("src")), parse_network("dst",
                                                                          message.get("dst"))
        if src is None and dst is None:
            raise ValueError("neither src nor dst is given")
        if src is not None and dst is not None and src.version != dst.version:
            raise ValueError("src and dst are of different IP versions")
        sport, dport = _port("sport", message.get("sport")), _port("dport", message.get("dport"))
        start, expiry = message.get("start", now), message.get("expiry")
        # NaN, infinity, 1e308, an expiry before the start, a start or an expiry years ahead.
        if isinstance(expiry, (int, float)) and not isinstance(expiry, bool) \
                and math.isfinite(expiry) and expiry <= now:
            raise ValueError("the action has already expired")
        check_times(start, expiry, now, slack)
        assert isinstance(start, (int, float)) and isinstance(expiry, (int, float))
        if expiry > now + 2 * MAX_DURATION_SECONDS:
            raise ValueError(f"expiry {expiry:.13g} is more than 60 days ahead")
        sensor = message.get("sensor") if targeted else None
        if sensor is not None and (not isinstance(sensor, str) or not valid_sensor_name(sensor)):
            raise ValueError(f"bad sensor name {str(sensor)[:64]!r}")
        return cls(action_id, src, dst, sport, dport, float(start), float(expiry), sensor)

    def match_key(self) -> tuple:
        """Actions with equal keys block the same traffic (a new one extends the old)."""
        return (self.src, self.dst, self.sport, self.dport, self.sensor)

    def matches_ends(self, a: IPAddress, a_port: int, b: IPAddress, b_port: int) -> bool:
        """The connection between these two ends is blocked, whichever opened it."""
        return self._side(a, b, a_port, b_port) or self._side(b, a, b_port, a_port)

    def _side(self, client: IPAddress, server: IPAddress, cport: int, sport: int) -> bool:
        return ((self.src is None or client in self.src)
                and (self.dst is None or server in self.dst)
                and (self.sport is None or cport == self.sport)
                and (self.dport is None or sport == self.dport))

    def cuts(self, vsensor: Iterable[tuple[IPAddress, int]],
             sensors: Iterable[IPAddress] | None = None) -> tuple[IPAddress, int] | None:
        """The vSensor endpoint (address, port) whose connections from a sensor this action
        would block, or None. A sensor's end has one of ``sensors``' addresses (None: any
        address; empty: none known, so only an action open on that side cuts) and an
        ephemeral port: an action that names a port for the sensor's end is taken not to cut
        (the port is random, and the sensor's watch leaves its vSensor traffic out anyway)."""
        known = None if sensors is None else list(sensors)
        for address, port in vsensor:
            # The sensor opens the connection: as the action's source, or (reverse) as its
            # destination.
            for near, near_port, far, far_port in ((self.src, self.sport, self.dst, self.dport),
                                                   (self.dst, self.dport, self.src, self.sport)):
                if far is not None and (far.version != address.version or address not in far):
                    continue
                if far_port is not None and far_port != port:
                    continue
                if near_port is not None:
                    continue
                if near is None or (known is None and near.version == address.version) \
                        or any(s.version == near.version and s in near for s in known or ()):
                    return address, port
        return None

    def describe(self) -> str:
        parts = [f"src {self.src}" if self.src else "", f"dst {self.dst}" if self.dst else "",
                 f"sport {self.sport}" if self.sport else "",
                 f"dport {self.dport}" if self.dport else ""]
        return " ".join(p for p in parts if p) or "everything"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": "block",
                "src": str(self.src) if self.src else None,
                "dst": str(self.dst) if self.dst else None,
                "sport": self.sport, "dport": self.dport, "protocol": "tcp",
                "start": self.start, "expiry": self.expiry, "sensor": self.sensor}


@dataclass
class ActionCounts:
    """What an action did: on a sensor since its last report, on the vSensor summed over the
    reports (:meth:`add`)."""

    connections: int = 0
    segments: int = 0
    resets: int = 0
    first_hit: float | None = None
    last_hit: float | None = None
    enforcers: dict[str, int] = field(default_factory=dict)

    def add(self, report: dict[str, Any]) -> None:
        """Add one reported count (``as_json`` of a sensor's counts)."""
        self.connections += int(report.get("connections", 0))
        self.segments += int(report.get("segments", 0))
        self.resets += int(report.get("resets", 0))
        for name, count in dict(report.get("enforcers") or {}).items():
            self.enforcers[str(name)] = self.enforcers.get(str(name), 0) + int(count)
        first, last = report.get("first_hit"), report.get("last_hit")
        if isinstance(first, (int, float)):
            self.first_hit = first if self.first_hit is None else min(self.first_hit, first)
        if isinstance(last, (int, float)):
            self.last_hit = last if self.last_hit is None else max(self.last_hit, last)

    def as_json(self) -> dict[str, Any]:
        return {"connections": self.connections, "segments": self.segments,
                "resets": self.resets, "first_hit": self.first_hit, "last_hit": self.last_hit,
                "enforcers": dict(self.enforcers)}
