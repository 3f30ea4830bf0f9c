"""The vSensor's HTTP application (aiohttp): the server side of ``docs/protocol.md``.

Usage (the CLI does this over TLS)::

    settings = VSensorSettings(data_dir=Path("/var/lib/vsensor"), keys=["..."])
    app = create_app(settings)  # run with web.AppRunner + web.TCPSite(ssl_context=...)

This module only wires the parts together; each lives in a module of its own (``auth``,
``registration``, ``chunks``, ``sinks``, ``stores``, ``sensor_filters``, ``status``, ``metrics``,
``antigena``; see ``vsensor/README.md``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ossensor_core.wire.names import H_SERVER_TIME, PATH_CHUNKS, PATH_HEARTBEAT, PATH_REGISTER
from ossensor_core.wire.signing import Verified

from . import antigena
from .auth import Authenticator
from .chunks import ChunkReceiver
from .cluster import state as cluster_state
from .cluster.connection import Cluster
from .cluster.ingest import JetStreamSink
from .metrics import Metrics, metrics_registry, request_counter
from .registration import Registrar
from .registry import SensorRegistry, SensorState
from .server import ConnectionCounts, Handler, request_gate
from .sensor_filters import SensorFilters
from .settings import VSensorSettings
from .sinks import ChunkSink, LocalSink
from .status import StatusPages
from .stores import SensorStores

__all__ = ["VSENSOR", "VSensor", "VSensorSettings", "create_app"]


class VSensor:
    """One vSensor's parts and state, as the application holds it (``app[VSENSOR]``): what
    Antigena and tests reach."""

    def __init__(self, settings: VSensorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.counts = ConnectionCounts(settings)
        self.registry = SensorRegistry(settings)
        self.auth = Authenticator(settings, self.registry, self.metrics)
        self.filters = SensorFilters(settings, self.registry)
        #: Single mode's pcapng files; None in cluster mode (the store workers write them).
        self.stores: SensorStores | None = None
        self.sink: ChunkSink
        if settings.cluster is None:
            self.stores = SensorStores(settings)
            self.sink = LocalSink(self.stores)
        else:
            self.sink = JetStreamSink(settings.cluster)
        self.registrar = Registrar(settings, self.registry, self.auth, self.filters)
        self.chunks = ChunkReceiver(self.registry, self.auth, self.sink, self.metrics)
        #: Cluster mode's NATS connection, streams and buckets (connected at start); None in
        #: single mode.
        self.cluster: Cluster | None = None
        #: Cluster mode: the registry, replay check, actions and status shared with the other
        #: replicas (``cluster/state.py``); None in single mode.
        self.shared: cluster_state.ClusterState | None = None

    @property
    def sensors(self) -> dict[str, SensorState]:
        """Every sensor known since start, by name."""
        return self.registry.sensors

    def now(self) -> float:
        return self.settings.now()

    async def authenticate(self, request: web.Request) -> tuple[Verified, bytes]:
        """Read and verify a sensor's request (:meth:`.auth.Authenticator.authenticate`)."""
        return await self.auth.authenticate(request)

    async def cluster_status(self) -> dict[str, Any] | None:
        """Cluster mode's part of the status pages (None before start and in single mode)."""
        return await self.shared.replicas.status() if self.shared is not None else None

    async def start(self, app: web.Application) -> None:
        if self.settings.cluster is not None:
            self.cluster = await Cluster.connect(self.settings.cluster,
                                                 replay_window=2 * self.settings.skew_seconds)
            assert isinstance(self.sink, JetStreamSink)
            self.sink.bind(self.cluster)
        try:
            if self.cluster is not None:
                self.shared = await cluster_state.join(self, self.cluster, app)
            await self.sink.start()
        except BaseException:  # aiohttp runs no cleanup after a failed start
            if self.shared is not None:
                await self.shared.close()
            if self.cluster is not None:
                await self.cluster.close()
            raise

    async def close(self, app: web.Application | None = None) -> None:
        """Complete every open file (``.part`` renamed); later chunks get 503."""
        await self.sink.close()
        self.auth.close()
        if self.shared is not None:
            await self.shared.close()
        if self.cluster is not None:
            await self.cluster.close()


VSENSOR = web.AppKey("vsensor", VSensor)


async def _add_server_time(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries the vSensor's clock, so a sensor can see its own skew."""
    response.headers[H_SERVER_TIME] = f"{request.app[VSENSOR].now():.3f}"


def _body_budget(vsensor: VSensor):
    """Middleware: a request's share of the body budget is given back once it is answered."""

    @web.middleware
    async def release(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            vsensor.auth.release_body(request)

    return release


def create_app(settings: VSensorSettings) -> web.Application:
    """The vSensor as an aiohttp application; files are completed in its cleanup. Serve it
    through :func:`.server.start_guarded` for the connection caps and deadlines."""
    vsensor = VSensor(settings)
    app = web.Application(client_max_size=settings.client_max_size,
                          middlewares=[request_counter(vsensor.metrics),
                                       request_gate(vsensor.counts), _body_budget(vsensor)])
    app[VSENSOR] = vsensor
    replica = settings.cluster.name if settings.cluster is not None else None
    pages = StatusPages(settings, vsensor.registry,
                        metrics_registry(vsensor.metrics, vsensor.registry, replica),
                        vsensor.cluster_status if replica is not None else None)
    app.router.add_post(PATH_REGISTER, vsensor.registrar.register)
    app.router.add_post(PATH_CHUNKS, vsensor.chunks.receive)
    app.router.add_post(PATH_HEARTBEAT, vsensor.registrar.heartbeat)
    app.router.add_get("/status", pages.status_html)
    app.router.add_get("/status.json", pages.status_json)
    app.router.add_get("/metrics", pages.metrics)
    antigena.setup(app, vsensor)
    app.on_response_prepare.append(_add_server_time)
    app.on_startup.append(vsensor.start)
    app.on_cleanup.append(vsensor.close)
    return app
