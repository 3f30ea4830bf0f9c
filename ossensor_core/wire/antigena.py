"""Antigena's messages as both ends hold them: the block action the vSensor issues and the
sensor enforces, and the counts a sensor reports for it (``docs/antigena.md``). The sensor's
matching of segments lives in ``plugins/antigena``; the vSensor's bookkeeping in
``ossensor_vsensor.antigena``. Pure: no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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

    def match_key(self) -> tuple:
        """Actions with equal keys block the same traffic (a new one extends the old)."""
        return (self.src, self.dst, self.sport, self.dport, self.sensor)

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
