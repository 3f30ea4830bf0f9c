"""``/metrics``: the vSensor's counters in the Prometheus text format, via ``prometheus_client``.

The endpoints count into plain :class:`collections.Counter` objects (cheap, and easy for tests
to read); :class:`VSensorCollector` turns them and the per-sensor state into metric families at
scrape time. Each application has its own :class:`~prometheus_client.CollectorRegistry`, so
many vSensors can run in one process (the tests do) without sharing a series.

The series names and labels are an interface (dashboards, alerts): ``FAMILIES`` lists them,
and ``tests/vsensor/test_metrics.py`` holds them to what earlier versions exposed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import NamedTuple

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .registry import SensorRegistry, SensorState


class Metrics:
    """The vSensor-wide counters the endpoints add to (per-sensor ones live in SensorState)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # by (endpoint, status)
        self.auth_failures: Counter[str] = Counter()  # by reason code
        self.chunks: Counter[str] = Counter()  # by result: stored, duplicate, malformed, ...
        self.packets = 0
        self.bytes = 0


class Family(NamedTuple):
    """One metric family as exposed: name (counters with their ``_total``), kind, HELP, label
    names, and its samples ((label values, value) pairs) from the counters and the sensors."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    samples: Callable[[Metrics, list[SensorState]], Iterable[tuple[tuple[str, ...], float]]]


FAMILIES: tuple[Family, ...] = (
    Family("ossensor_vsensor_requests_total", "counter",
           "HTTP requests by endpoint and status.", ("endpoint", "status"),
           lambda m, _: sorted(m.requests.items())),
    Family("ossensor_vsensor_auth_failures_total", "counter",
           "Requests refused by authentication, by reason.", ("reason",),
           lambda m, _: [((r,), n) for r, n in sorted(m.auth_failures.items())]),
    Family("ossensor_vsensor_chunks_total", "counter", "Chunks received, by result.",
           ("result",), lambda m, _: [((r,), n) for r, n in sorted(m.chunks.items())]),
    Family("ossensor_vsensor_packets_stored_total", "counter", "Packets stored.", (),
           lambda m, _: [((), m.packets)]),
    Family("ossensor_vsensor_bytes_stored_total", "counter", "pcapng bytes stored.", (),
           lambda m, _: [((), m.bytes)]),
    Family("ossensor_vsensor_sensor_packets_stored_total", "counter",
           "Packets stored per sensor.", ("sensor",),
           lambda _, sensors: [((s.name,), s.packets) for s in sensors]),
    Family("ossensor_vsensor_sensor_bytes_stored_total", "counter",
           "pcapng bytes stored per sensor.", ("sensor",),
           lambda _, sensors: [((s.name,), s.bytes) for s in sensors]),
    Family("ossensor_vsensor_sensor_chunks_stored_total", "counter",
           "Chunks stored per sensor.", ("sensor",),
           lambda _, sensors: [((s.name,), s.chunks) for s in sensors]),
    Family("ossensor_vsensor_sensor_kernel_drops", "gauge",
           "Kernel drops reported by the sensor's last heartbeat or chunk.", ("sensor",),
           lambda _, sensors: [((s.name,), s.kernel_drops) for s in sensors]),
    Family("ossensor_vsensor_sensor_last_seen_seconds", "gauge",
           "Unix time of the sensor's last authenticated request.", ("sensor",),
           lambda _, sensors: [((s.name,), s.last_seen or 0) for s in sensors]),
)


class VSensorCollector:
    """A ``prometheus_client`` collector that reads :class:`Metrics` and the sensors on scrape."""

    def __init__(self, metrics: Metrics, registry: SensorRegistry,
                 replica: str | None = None) -> None:
        """``replica``: cluster mode's name of this replica, a label on every series."""
        self.metrics = metrics
        self.registry = registry
        self.replica = replica

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (what ``CollectorRegistry.register`` checks)."""
        return (_family(f, self.replica) for f in FAMILIES)

    def collect(self) -> Iterator[Metric]:
        # This process's sensors only (never the mirror of the other replicas' ones), so that
        # the series of all replicas add up.
        sensors = list(self.registry.sensors.values())
        extra = (self.replica,) if self.replica is not None else ()
        for spec in FAMILIES:
            family = _family(spec, self.replica)
            for labels, value in spec.samples(self.metrics, sensors):
                # no created time: no ``_created`` series
                family.add_metric((*labels, *extra), value)
            yield family


def _family(spec: Family, replica: str | None = None
            ) -> CounterMetricFamily | GaugeMetricFamily:
    # CounterMetricFamily takes the name with or without ``_total`` and exposes it with.
    kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    labels = (*spec.labels, "replica") if replica is not None else spec.labels
    return kind(spec.name, spec.help, labels=labels)


def metrics_registry(metrics: Metrics, registry: SensorRegistry,
                     replica: str | None = None) -> CollectorRegistry:
    """A registry of its own for one application (no process or platform collectors);
    ``replica``: cluster mode's label (see :class:`VSensorCollector`)."""
    collectors = CollectorRegistry()
    collectors.register(VSensorCollector(metrics, registry, replica))
    return collectors


def exposition(collectors: CollectorRegistry) -> bytes:
    """The text format (0.0.4) of everything in ``collectors``."""
    return generate_latest(collectors)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_counter(metrics: Metrics) -> Callable[[web.Request, Handler],
                                                  Awaitable[web.StreamResponse]]:
    """An aiohttp middleware counting every request by route and status (500: it raised)."""

    @web.middleware
    async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.requests[(endpoint, str(exc.status))] += 1
            raise
        except Exception:
            metrics.requests[(endpoint, "500")] += 1
            raise
        metrics.requests[(endpoint, str(response.status))] += 1
        return response

    return count_requests
