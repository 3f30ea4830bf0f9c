"""Each sensor's capture filter, handed out with registration and heartbeat answers.

A sensor leaves out its traffic to the vSensor and the packets a peer sensor stores instead
(the lower-address rule of ``filters.py``, which computes; this module decides when, and keeps
the results). Claims change rarely and heartbeats come often, so everything here is cached
and recomputed only when the set of live sensors or a claim changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import Any

from aiohttp import web

from ossensor_core.capture.peer_exclusion import AddressSet

from .filters import (FEATURE_PEER_RANGES, FilterResult, build_filter, claimed_once, peer_set,
                      self_expression)
from .server import BALANCER_FRONT
from .registry import SensorRegistry, SensorState
from .settings import VSensorSettings

log = logging.getLogger("ossensor_vsensor")

FILTER_CACHE_SIZE = 4096  # compiled filters kept (one per distinct sensor view)
MAX_FRONTS = 8  # load balancer front ends remembered (their addresses are few)


class SensorFilters:
    """Filters of every sensor, from what the live sensors claim."""

    def __init__(self, settings: VSensorSettings, registry: SensorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._filter_notes: set[str] = set()
        self._filters: dict[tuple, FilterResult] = {}
        self._claims_version = 0  # bumped when a claim changes or a sensor expires
        self._once: tuple[int, AddressSet, str] | None = None
        self._peers: dict[AddressSet, AddressSet] = {}
        self._live_checked = 0.0
        self._live: frozenset[str] = frozenset()
        self._fronts: OrderedDict[tuple[str, int], None] = OrderedDict()

    def claims_changed(self) -> None:
        """A sensor registered for the first time or claims other addresses now."""
        self._claims_version += 1

    def _claimed_once(self) -> tuple[AddressSet, str]:
        """What exactly one live sensor claims, and its digest (``filters.py``); recomputed
        when a claim changed (a sweep: about 20 ms for 5,000 sensors).

        Sensors silent for six heartbeats (at least a minute) are left out (checked once a
        second): that only makes the others keep more (duplicates, never a gap)."""
        now = self.settings.now()
        sensors: dict[str, SensorState] = {}
        if now - self._live_checked >= 1.0 or self._once is None \
                or self._once[0] != self._claims_version:
            self._live_checked = now
            sensors = self.registry.everyone()  # in cluster mode: every replica's sensors
            horizon = now - max(60.0, 6 * self.settings.heartbeat_seconds)
            live = frozenset(n for n, s in sensors.items()
                             if s.registered is not None and (s.last_seen or 0) >= horizon)
            if live != self._live:
                self._live = live
                self._claims_version += 1
        if self._once is None or self._once[0] != self._claims_version:
            sensors = sensors or self.registry.everyone()
            once = claimed_once(sensors[n].claim for n in self._live if n in sensors)
            self._once = (self._claims_version, once, once.digest())
            self._peers.clear()
        return self._once[1], self._once[2]

    def _peers_of(self, state: SensorState) -> tuple[str, AddressSet]:
        """The id of the ranges ``state``'s sensor drops as a packet's lower address (cheap:
        from the digest of the claims and its own claim), and what exactly one sensor claims,
        from which :meth:`_peer_set` makes the ranges when they have to be sent."""
        once, digest = self._claimed_once()
        return hashlib.sha256(f"{digest} {state.claim.texts()}".encode()).hexdigest()[:16], once

    def _peer_set(self, state: SensorState, once: AddressSet) -> AddressSet:
        peers = self._peers.get(state.claim)
        if peers is None:
            if len(self._peers) >= FILTER_CACHE_SIZE:
                self._peers.clear()
            peers = self._peers[state.claim] = peer_set(state.claim, once)
        return peers

    def own_expression(self, request: web.Request) -> str:
        """The sensors' traffic to this vSensor, which their filters leave out: to the address
        the request came to, on every port sensors use, and to every load balancer front end
        that passed a sensor's request here (from PROXY headers, ``server.BALANCER_FRONT``; the
        last :data:`MAX_FRONTS`): a sensor that reaches this vSensor through the balancer, or
        falls back to it, must not capture that either."""
        local = _local_address(request)
        ports = set(self.settings.vsensor_ports)
        if local and local[1]:
            ports.add(local[1])
        front = request.get(BALANCER_FRONT)
        if front is not None:
            self._fronts[front] = None
            self._fronts.move_to_end(front)
            while len(self._fronts) > MAX_FRONTS:
                self._fronts.popitem(last=False)
        parts = [self_expression(local[0], ports)] if local else []
        parts += [self_expression(host, [port]) for host, port in self._fronts
                  if not (local and host == local[0] and port in ports)]
        return " and ".join(parts)

    async def filter_for(self, sensor: str, request: web.Request,
                         known_id: str | None = None) -> dict[str, Any]:
        """The filter fields of a registration or heartbeat answer (``docs/protocol.md``)."""
        own = self.own_expression(request)
        state = self.registry.sensors[sensor]
        peers_id, once = self._peers_of(state)
        if FEATURE_PEER_RANGES in state.features:
            # The sensor generates BPF itself; the ranges are sent (and computed) only when
            # they changed, so a steady heartbeat costs next to nothing here.
            ranges: dict[str, Any] = {"id": peers_id, "rule": "lower-address"}
            if known_id != peers_id:
                ranges["ranges"] = self._peer_set(state, once).texts()
            return {"filter": own, "peer_ranges": ranges}
        peers = self._peer_set(state, once)
        key = (own, peers)
        result = self._filters.get(key)
        if result is None:
            # Compiling hundreds of networks takes seconds: off the event loop, and only when
            # the set of sensors changed (heartbeats reuse the result).
            result = await asyncio.to_thread(build_filter, own, peers)
            if len(self._filters) >= FILTER_CACHE_SIZE:
                self._filters.clear()
            self._filters[key] = result
        if result.peers_dropped and result.reason not in self._filter_notes:
            if len(self._filter_notes) >= FILTER_CACHE_SIZE:
                self._filter_notes.clear()
            self._filter_notes.add(result.reason)
            log.warning("filter for %r leaves out the peer part (%s; duplicates are stored "
                        "instead): %s", sensor, peers.summary(), result.reason)
        return {"filter": result.expression}


def _local_address(request: web.Request) -> tuple[str, int] | None:
    """The address and port the request came to (the vSensor side of the connection)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname:
        return None
    host = str(sockname[0]).split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:  # an IPv4 client on a dual-stack socket
        host = host[7:]
    return host, int(sockname[1])
