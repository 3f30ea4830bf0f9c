"""The sensors this vSensor knows: what each registered, when it was last seen, who holds a name.

Kept in memory only: after a restart every sensor registers again (``unknown_sensor``), which
is what tells the vSensor its addresses, claims and filter features. In cluster mode the
sensors of the other replicas are mirrored into :attr:`SensorRegistry.remote` from the shared
bucket (``cluster/registry.py``), for peer ranges and the status pages; what this replica
decides from (chunks, heartbeats, ``unknown_sensor``) stays its own :attr:`~SensorRegistry.sensors`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ossensor_core.capture.peer_exclusion import AddressSet

from .settings import VSensorSettings


@dataclass
class SensorState:
    """What the vSensor knows about one sensor (shown on the status pages)."""

    name: str
    version: int | None = None
    software: str = ""
    addresses: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    registered: float | None = None
    last_seen: float | None = None
    packets: int = 0
    bytes: int = 0
    chunks: int = 0
    duplicates: int = 0
    #: Interface -> {"packets": n, "drops": n} (kernel counters): set by every heartbeat,
    #: moved forward by the interface table of v2 chunks in between.
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Workload ranges (pod CIDRs) behind the sensor, and what it claims with its addresses.
    workloads: list[str] = field(default_factory=list)
    claim: AddressSet = field(default_factory=AddressSet)
    #: Claims left out (outside the allow-list, or too wide): ``{"claim", "reason"}``, the
    #: first ``claims.IGNORED_SHOWN``, and how many in all.
    ignored_claims: list[dict[str, str]] = field(default_factory=list)
    ignored_claims_count: int = 0
    features: frozenset[str] = frozenset()
    #: The sensor's last word on its filter (e.g. the peer part did not fit), "" when fine.
    filter_note: str = ""
    #: The instance id of the process that registered (``X-Ossensor-Instance``), and the last
    #: other live instance that tried to use the same name (refused, see ``name_in_use``).
    instance: str = ""
    conflict: dict[str, Any] = field(default_factory=dict)
    #: The ``primary_address`` of the registration (claimed with the addresses).
    primary: str = ""
    #: Cluster mode: the replica the sensor talks to ("" in single mode).
    replica: str = ""

    @property
    def kernel_drops(self) -> int:
        """Kernel drops over all interfaces, as last reported."""
        return sum(v.get("drops", 0) for v in self.kernel.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "software": self.software,
            "addresses": self.addresses, "interfaces": self.interfaces,
            "registered": self.registered, "last_seen": self.last_seen,
            "packets": self.packets, "bytes": self.bytes, "chunks": self.chunks,
            "duplicates": self.duplicates, "workloads": self.workloads,
            "ignored_claims": self.ignored_claims,
            "ignored_claims_count": self.ignored_claims_count,
            "filter_note": self.filter_note, "instance": self.instance,
            "name_conflict": self.conflict,
            "kernel_packets": sum(v.get("packets", 0) for v in self.kernel.values()),
            "kernel_drops": self.kernel_drops,
            "kernel": self.kernel,
            **({"replica": self.replica} if self.replica else {}),
        }


class SensorRegistry:
    """Every sensor that made an authenticated request since this process started."""

    def __init__(self, settings: VSensorSettings) -> None:
        self.settings = settings
        self.sensors: dict[str, SensorState] = {}
        #: Cluster mode: the sensors of the other replicas, as the shared bucket has them.
        self.remote: dict[str, SensorState] = {}
        #: Cluster mode: told of every authenticated request of a registered sensor (with
        #: ``changed`` when its record must be written now), so the shared record follows.
        self.touched: Callable[..., None] | None = None

    def everyone(self) -> dict[str, SensorState]:
        """Every sensor of the cluster (this process's alone in single mode): for a sensor
        known here and on another replica, the one seen last."""
        if not self.remote:
            return self.sensors
        merged = dict(self.remote)
        for name, state in self.sensors.items():
            other = merged.get(name)
            if other is None or (state.registered is not None
                                 and (state.last_seen or 0) > (other.last_seen or 0)):
                merged[name] = state
        return merged

    def touch(self, state: SensorState, changed: bool = False) -> None:
        """``state``'s sensor made a request (``changed``: its record changed)."""
        if self.touched is not None:
            self.touched(state, changed)

    def get(self, sensor: str) -> SensorState | None:
        return self.sensors.get(sensor)

    def state(self, sensor: str) -> SensorState:
        """The state of ``sensor``, made on its first authenticated request."""
        state = self.sensors.get(sensor)
        if state is None:
            state = self.sensors[sensor] = SensorState(sensor)
        return state

    def is_registered(self, sensor: str) -> bool:
        """Whether ``sensor`` registered since this process started."""
        state = self.sensors.get(sensor)
        return state is not None and state.registered is not None

    def held_by_another(self, state: SensorState, instance: str) -> bool:
        """Whether an instance other than ``instance`` holds the name and was seen within three
        heartbeats (``name_in_use``)."""
        return bool(state.instance and instance != state.instance
                    and state.last_seen is not None
                    and self.settings.now() - state.last_seen
                    <= 3 * self.settings.heartbeat_seconds)

    def sorted_by_name(self) -> list[SensorState]:
        """Every sensor of the cluster, by name (the status pages)."""
        return sorted(self.everyone().values(), key=lambda s: s.name)
