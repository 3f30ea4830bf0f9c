"""The sensor registry shared by the replicas: ``ossensor-sensors``, one record per sensor.

A replica writes the record of each sensor that registers with it (the addresses, workload
ranges and features it registered, its instance, when it was last seen, its counters, and the
replica's name) and follows the bucket (:class:`~.watch.BucketWatch`) into a mirror
(``SensorRegistry.remote``) of the sensors that talk to the other replicas. Peer ranges are then
computed over every sensor of every replica, and the status pages show them all.

The ``name_in_use`` rule across replicas rests on the record's revision: a registration reads the
record, refuses the name when another instance holds it and was seen within three heartbeats,
and writes its own record only if nobody wrote in between (``update`` with the revision read;
on a conflict it reads again). A record is hostile until :func:`parse_record` has checked it as
strictly as a registration from the network: names, addresses and ranges parsed, the claims put
through the same allow-list, every list, text, number and time bounded.

Writes per heartbeat: a sensor's record is written when it registers, stops, changes its filter
note, or when the ``last_seen`` written is older than :data:`REFRESH_HEARTBEATS` heartbeats
(with the default 10 s heartbeat: one write every second heartbeat, not one per request;
measured in ``test_cluster_state.py``: 10 heartbeats 1 s apart wrote the record 4 times).
Other replicas then see a live sensor at most ``REFRESH_HEARTBEATS`` heartbeats (plus the
propagation) behind, well inside the three heartbeats of ``name_in_use`` and the six after
which peer ranges leave a silent sensor out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from ..claims import IGNORED_SHOWN, ClaimPolicy
from ..filters import claimed_set, parse_address
from ..registry import SensorRegistry, SensorState
from ..settings import VSensorSettings
from . import names
from .watch import BucketWatch, shown

log = logging.getLogger("ossensor_vsensor.cluster")

BUCKET = "ossensor-sensors"
RECORD_VERSION = 1
#: Far above a real registration (a node's addresses, a few pod ranges), under NATS's 1 MiB.
MAX_RECORD_BYTES = 256 << 10
#: Sensors mirrored from the other replicas; beyond, new ones are skipped (logged).
MAX_SENSORS = 50_000
MAX_LIST = 1024  # addresses, workloads, interfaces, features per record
MAX_TEXT = 256
REFRESH_HEARTBEATS = 1.5
#: Writes of one record that conflict with another replica's before the registration gives up.
CAS_ATTEMPTS = 4


class ClusterUnavailable(Exception):
    """NATS (a JetStream quorum) does not answer: the request cannot be handled safely now."""


def _text(record: dict[str, Any], name: str, limit: int = MAX_TEXT) -> str:
    value = record.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{name} is not text of at most {limit} characters")
    return value


def _texts(record: dict[str, Any], name: str) -> list[str]:
    value = record.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_LIST \
            or not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value):
        raise ValueError(f"{name} is not a list of at most {MAX_LIST} short texts")
    return value


def _count(record: dict[str, Any], name: str) -> int:
    value = record.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"{name} is not a count")
    return value


def _time(record: dict[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value < 1 << 36:
        raise ValueError(f"{name} is not a time")
    return float(value)


def encode_record(state: SensorState, replica: str) -> bytes:
    """The record of ``state`` as this replica writes it, within the bounds that
    :func:`parse_record` checks (lists cut at :data:`MAX_LIST`, interface and feature names at
    :data:`MAX_TEXT`); ValueError when it is still over :data:`MAX_RECORD_BYTES`."""
    value = json.dumps({
        "v": RECORD_VERSION, "name": state.name, "replica": replica,
        "instance": state.instance, "version": state.version, "software": state.software,
        "addresses": state.addresses[:MAX_LIST], "primary": state.primary,
        "interfaces": [i[:MAX_TEXT] for i in state.interfaces[:MAX_LIST]],
        "workloads": state.workloads[:MAX_LIST],
        "features": [f[:MAX_TEXT] for f in sorted(state.features)[:MAX_LIST]],
        "filter_note": state.filter_note,
        "registered": state.registered, "last_seen": state.last_seen,
        "packets": state.packets, "bytes": state.bytes, "chunks": state.chunks,
        "duplicates": state.duplicates}, separators=(",", ":")).encode()
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"the registration of {state.name!r} takes {len(value)} bytes in the "
                         f"shared registry, over its limit of {MAX_RECORD_BYTES}")
    return value


def parse_record(key: str, value: bytes, claims: ClaimPolicy) -> SensorState:
    """A record read from the bucket, checked like a registration; ValueError names the fault."""
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"{len(value)} bytes, over {MAX_RECORD_BYTES}")
    sensor = names.name(key)
    from ..registration import json_object  # the same JSON rules as a sensor's body

    record = json_object(value)
    if record.get("v") != RECORD_VERSION:
        raise ValueError(f"not a record of version {RECORD_VERSION}")
    if record.get("name") != sensor:
        raise ValueError("the record's name is not the sensor of its key")
    version = record.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 <= version < 1000):
        raise ValueError("version is not a protocol version")
    addresses, workloads = _texts(record, "addresses"), _texts(record, "workloads")
    for address in addresses:
        parse_address(address)
    primary = _text(record, "primary")
    kept_addresses, kept_workloads, ignored = claims.sort(
        addresses + ([primary] if primary else []), workloads)
    state = SensorState(sensor, version=version, software=_text(record, "software", 200),
                        addresses=addresses, interfaces=_texts(record, "interfaces"),
                        registered=_time(record, "registered"),
                        last_seen=_time(record, "last_seen"),
                        packets=_count(record, "packets"), bytes=_count(record, "bytes"),
                        chunks=_count(record, "chunks"),
                        duplicates=_count(record, "duplicates"), workloads=workloads,
                        claim=claimed_set(kept_addresses, kept_workloads),
                        ignored_claims=ignored[:IGNORED_SHOWN],
                        ignored_claims_count=len(ignored),
                        features=frozenset(_texts(record, "features")),
                        filter_note=_text(record, "filter_note", 500),
                        instance=_text(record, "instance", 64), primary=primary,
                        replica=_text(record, "replica", 128))
    if not state.replica:
        raise ValueError("the record names no replica")
    return state


class SharedRegistry:
    """This replica's side of ``ossensor-sensors``: its writes, and the mirror of the rest."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry, kv: Any,
                 replica: str, claims: ClaimPolicy,
                 claims_changed: Callable[[str], None], js: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.kv = kv
        self.replica = replica
        self.claims = claims
        self.claims_changed = claims_changed
        self.revisions: dict[str, int] = {}
        self.written_seen: dict[str, float] = {}  # last_seen of our last write, per sensor
        self.writes: dict[str, int] = {"register": 0, "refresh": 0, "change": 0}
        self.watch = BucketWatch(kv, BUCKET, self._on_entry, MAX_RECORD_BYTES, js)
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    async def start(self, wait: float = 10.0) -> None:
        self.registry.touched = self.touch
        self.watch.start()
        try:
            await asyncio.wait_for(self.watch.ready.wait(), wait)
        except TimeoutError:
            log.warning("NATS: %s not read within %g s: starting with what came", BUCKET, wait)

    async def stop(self) -> None:
        await self.watch.stop()
        self._again.clear()
        for task in list(self._pending.values()):
            task.cancel()

    def _window(self) -> float:
        return 3 * self.settings.heartbeat_seconds

    def _on_entry(self, key: str, value: bytes | None, revision: int) -> None:
        if value is None:
            sensor = names.name(key)
            self.revisions.pop(sensor, None)
            if self.registry.remote.pop(sensor, None) is not None:
                self.claims_changed(sensor)
            return
        state = parse_record(key, value, self.claims)
        sensor = state.name
        if sensor not in self.revisions and len(self.revisions) >= MAX_SENSORS:
            raise ValueError(f"{MAX_SENSORS} sensors mirrored already")
        self.revisions[sensor] = max(revision, self.revisions.get(sensor, 0))
        local = self.registry.sensors.get(sensor)
        if state.replica == self.replica and local is not None and local.registered:
            return  # our own write coming back
        if local is not None:
            # Written by another replica after our last write: the sensor moved there (or
            # another instance took the name, or it stopped). Who holds the name follows, so
            # the local name_in_use check agrees with the cluster's.
            local.instance, local.last_seen = state.instance, state.last_seen
        known = self.registry.remote.get(sensor)
        self.registry.remote[sensor] = state
        if known is None or known.claim != state.claim or \
                (known.last_seen is None) != (state.last_seen is None):
            self.claims_changed(sensor)

    async def _get(self, sensor: str) -> tuple[SensorState | None, int]:
        """The record of ``sensor`` now (None if absent or unreadable) and its revision."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            entry = await self.kv.get(names.token(sensor))
        except (KeyNotFoundError, KeyDeletedError) as exc:  # deleted: its marker's revision
            return None, int(exc.entry.revision or 0) if exc.entry is not None else 0
        except Exception as exc:
            raise ClusterUnavailable(str(exc)[:200] or type(exc).__name__) from None
        try:
            return parse_record(entry.key, bytes(entry.value or b""), self.claims), \
                int(entry.revision)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            self.watch.skip(entry.key, entry.revision, str(exc))
            return None, int(entry.revision)

    def holds(self, record: SensorState | None, instance: str) -> bool:
        """Whether another live instance holds the name in ``record`` (``name_in_use``)."""
        return bool(record is not None and record.instance and record.instance != instance
                    and record.last_seen is not None
                    and self.settings.now() - record.last_seen <= self._window())

    async def register(self, state: SensorState) -> SensorState | None:
        """Write ``state`` (a registration about to be accepted) unless another live instance
        holds the name on any replica: that holder's record then, else None.
        ClusterUnavailable when NATS does not answer."""
        for _ in range(CAS_ATTEMPTS):
            record, revision = await self._get(state.name)
            if self.holds(record, state.instance):
                return record
            if await self._write(state, revision, "register"):
                return None
        raise ClusterUnavailable(f"{CAS_ATTEMPTS} conflicting writes of {state.name!r}")

    async def _write(self, state: SensorState, revision: int, reason: str) -> bool:
        """Compare and set: False when another write came first (ValueError: the record is
        too large)."""
        from nats.js.errors import KeyWrongLastSequenceError

        value = encode_record(state, self.replica)
        try:
            written = await self.kv.update(names.token(state.name), value, last=revision)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:
            raise ClusterUnavailable(str(exc)[:200] or type(exc).__name__) from None
        self.revisions[state.name] = written
        self.written_seen[state.name] = state.last_seen or 0.0
        self.writes[reason] += 1
        return True

    def touch(self, state: SensorState, changed: bool = False) -> None:
        """A request of ``state``'s sensor was taken: write its record in the background when
        something changed or the ``last_seen`` written is getting old (see the docstring)."""
        if state.registered is None:
            return
        if state.name in self._pending:
            if changed:  # written again once the write in flight is done
                self._again.add(state.name)
            return
        age = (state.last_seen or 0.0) - self.written_seen.get(state.name, 0.0)
        if not changed and age < REFRESH_HEARTBEATS * self.settings.heartbeat_seconds:
            return
        if len(self.written_seen) >= MAX_SENSORS and state.name not in self.written_seen:
            self.written_seen.clear()  # bounded; the next touch writes again
        task = asyncio.get_running_loop().create_task(
            self._refresh(state, "change" if changed else "refresh"))
        self._pending[state.name] = task
        task.add_done_callback(lambda _: self._written(state))

    def _written(self, state: SensorState) -> None:
        self._pending.pop(state.name, None)
        if state.name in self._again:
            self._again.discard(state.name)
            self.touch(state, changed=True)

    async def _refresh(self, state: SensorState, reason: str) -> None:
        """Write ``state`` while this instance still holds the name (best effort: a failure
        only delays what the others see)."""
        try:
            for _ in range(CAS_ATTEMPTS):
                revision = self.revisions.get(state.name, 0)
                snapshot = dataclasses.replace(state)
                if await self._write(snapshot, revision, reason):
                    return
                record, revision = await self._get(state.name)
                self.revisions[state.name] = revision
                if self.holds(record, state.instance):
                    return  # another instance took the name on another replica
        except (ClusterUnavailable, ValueError) as exc:
            log.warning("NATS: cannot write the record of sensor %s: %s",
                        shown(state.name), str(exc)[:300])
