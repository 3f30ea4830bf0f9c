"""A replica's shared state, wired at start: what ``VSensor.start`` calls in cluster mode.

:func:`join` gives the application's parts their cluster side: the registry's shared bucket
(``registry.py``), the replay check (``nonces.py``), Antigena's actions and reports
(``actions.py``), and this replica's record for the status pages (``replicas.py``). Each part
keeps a hook of its own (``shared``, ``shared_nonces``, ``touched``) that is None in single mode.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import antigena
from .actions import REPORTS, SharedActions
from .actions import BUCKET as ACTIONS
from .nonces import BUCKET as NONCES
from .nonces import SharedNonces
from .registry import BUCKET as SENSORS
from .registry import SharedRegistry
from .replicas import ReplicaStatus

if TYPE_CHECKING:
    from ..app import VSensor
    from .connection import Cluster


class ClusterState:
    """The shared parts of one replica (:func:`join`), stopped by :meth:`close`."""

    def __init__(self, registry: SharedRegistry, nonces: SharedNonces,
                 actions: SharedActions, replicas: ReplicaStatus) -> None:
        self.registry = registry
        self.nonces = nonces
        self.actions = actions
        self.replicas = replicas
        self._background: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        for part in (self.replicas, self.actions, self.registry):
            with contextlib.suppress(Exception):
                await part.stop()


def _counters(vsensor: VSensor, hub: antigena.AntigenaHub) -> dict[str, int]:
    """This replica's own counters, as its record carries them (they add up over replicas)."""
    metrics = vsensor.metrics
    counters = {"sensors": sum(1 for s in vsensor.registry.sensors.values() if s.registered),
                "packets_stored": metrics.packets, "bytes_stored": metrics.bytes,
                "requests": sum(metrics.requests.values()),
                "auth_failures": sum(metrics.auth_failures.values()),
                "antigena_reports": sum(s.reports for s in hub.sensors.values()),
                "antigena_connections": sum(c.connections for s in hub.sensors.values()
                                            for c in s.actions.values()),
                "antigena_resets": sum(c.resets for s in hub.sensors.values()
                                       for c in s.actions.values())}
    counters.update({f"chunks_{k}": v for k, v in sorted(metrics.chunks.items())[:64]})
    return counters


async def join(vsensor: VSensor, cluster: Cluster, app: web.Application) -> ClusterState:
    """Give ``vsensor``'s parts their cluster side; returns once the mirrors are read."""
    hub = app[antigena.ANTIGENA]
    background: set[asyncio.Task[Any]] = set()

    def claims_changed(sensor: str) -> None:
        vsensor.filters.claims_changed()
        task = asyncio.get_running_loop().create_task(hub.filters_changed(sensor))
        background.add(task)
        task.add_done_callback(background.discard)

    shared = SharedRegistry(vsensor.settings, vsensor.registry, cluster.kv(SENSORS),
                            cluster.name, vsensor.registrar.claims, claims_changed,
                            cluster.js)
    # A request waits for the replay check no longer than for its chunk's publish.
    nonces = SharedNonces(cluster.kv(NONCES), timeout=cluster.settings.publish_timeout)
    actions = SharedActions(cluster.kv(ACTIONS), cluster.kv(REPORTS), hub.actions,
                            vsensor.now, hub.push, cluster.js)
    direct = vsensor.settings.direct
    replicas = ReplicaStatus(cluster, f"{direct[0]}:{direct[1]}" if direct else "",
                             vsensor.now, lambda: _counters(vsensor, hub))
    await asyncio.gather(shared.start(), actions.start())
    vsensor.registrar.shared = shared
    vsensor.auth.shared_nonces = nonces
    hub.shared = actions
    await replicas.start()
    state = ClusterState(shared, nonces, actions, replicas)
    state._background = background
    return state
