"""Prometheus metrics of a running sensor (``OSSENSOR_METRICS_ADDRESS``, off when empty).

Values are read from the sensor when scraped, never counted per packet: the kernel's capture
counters, the core's chunk counters (``Sensor.stats``), the transport's counters
(``Transport.stats``: a series for each field that is not None), the filter in force, and what
plugins contribute through the hook ``ossensor_metrics`` (Antigena's actions). The endpoint is
served on the sensor's event loop (aiohttp), so scraping never races the capture tasks that read
the same counters. On a host network keep it on loopback (``127.0.0.1:9853``, the deploy/
default): the node's other pods cannot reach it, a node-local agent or an exec can.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ossensor_core.errors import ConfigError
from ossensor_core.pipeline.contracts import MetricSample

if TYPE_CHECKING:
    from ossensor_core.pipeline.sensor import Sensor

log = logging.getLogger("ossensor.metrics")

VARIABLE = "OSSENSOR_METRICS_ADDRESS"
PATH = "/metrics"
#: ``TransportStats`` field -> (metric name, help, counter or gauge)
_TRANSPORT_FIELDS: tuple[tuple[str, str, str, bool], ...] = (
    ("chunks_sent", "ossensor_transport_chunks_sent", "Chunks the transport delivered.", True),
    ("packets_sent", "ossensor_transport_packets_sent", "Packets in delivered chunks.", True),
    ("bytes_sent", "ossensor_transport_bytes_sent", "Encoded bytes delivered.", True),
    ("chunks_spooled", "ossensor_transport_chunks_spooled",
     "Chunks moved to the spool folder while the vSensor was away.", True),
    ("chunks_dropped", "ossensor_transport_chunks_dropped",
     "Chunks lost (spool full, or refused by the vSensor).", True),
    ("packets_dropped", "ossensor_transport_packets_dropped", "Packets in lost chunks.", True),
    ("reregistrations", "ossensor_transport_reregistrations",
     "Registrations repeated because the vSensor forgot this sensor.", True),
    ("chunk_retries", "ossensor_transport_chunk_retries",
     "Chunk deliveries that failed and were tried again later.", True),
    ("queued_chunks", "ossensor_transport_queued_chunks",
     "Chunks accepted and not delivered yet (memory and spool).", False),
    ("memory_queued_bytes", "ossensor_transport_memory_bytes",
     "Encoded bytes of the chunks waiting in memory.", False),
    ("spooled_chunks", "ossensor_transport_spool_chunks",
     "Chunks waiting in the spool folder.", False),
    ("spooled_bytes", "ossensor_transport_spool_bytes",
     "Bytes of the chunks waiting in the spool folder.", False),
)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ConfigError naming the variable."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    problem = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        problem = "give host:port, e.g. 127.0.0.1:9853"
    else:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                problem = "the host must be an IP address (or localhost)"
    if problem:
        raise ConfigError([f"{VARIABLE}: {text!r}: {problem}"])
    return host, int(port)


def interface_counters(name: str) -> list[tuple[str, int]]:
    """(direction, bytes) of interface ``name`` from sysfs; none when it is gone. The packet
    socket counts packets only, and summing frame lengths would touch every packet."""
    found = []
    for direction in ("rx", "tx"):
        try:
            with open(f"/sys/class/net/{name}/statistics/{direction}_bytes") as counter:
                found.append((direction, int(counter.read())))
        except (OSError, ValueError):
            return []
    return found


class SensorCollector(Collector):
    """Reads the sensor's counters at scrape time."""

    def __init__(self, sensor: Sensor) -> None:
        self.sensor = sensor

    def collect(self) -> Iterator[Any]:
        sensor = self.sensor
        own = sensor.stats()
        packets = CounterMetricFamily("ossensor_capture_packets",
                                      "Packets that passed the kernel filter, per interface.",
                                      labels=["interface"])
        drops = CounterMetricFamily("ossensor_capture_kernel_drops",
                                    "Packets the kernel dropped because the sensor was too slow.",
                                    labels=["interface"])
        interface_bytes = CounterMetricFamily(
            "ossensor_interface_bytes", "Bytes through a captured interface, before the capture "
            "filter (the kernel's interface counters).", labels=["interface", "direction"])
        for name, stats in sorted(sensor.capture_stats().items()):
            packets.add_metric([name], stats.packets)
            drops.add_metric([name], stats.drops)
            for direction, value in interface_counters(name):
                interface_bytes.add_metric([name, direction], value)
        yield packets
        yield drops
        yield interface_bytes
        yield GaugeMetricFamily("ossensor_capturing_interfaces", "Interfaces captured now.",
                                value=len(own.interfaces))
        yield CounterMetricFamily("ossensor_chunks", "Chunks the core handed to the transport.",
                                  value=own.chunks_sent)
        yield CounterMetricFamily("ossensor_chunk_packets",
                                  "Packets in chunks handed to the transport.",
                                  value=own.packets_sent)
        yield GaugeMetricFamily("ossensor_chunks_waiting",
                                "Chunks cut and waiting for the transport to take them.",
                                value=own.chunks_waiting)
        transport = sensor.transport
        transport_stats = transport.stats()
        fields = dataclasses.asdict(transport_stats)
        for attribute, name, help_text, counter in _TRANSPORT_FIELDS:
            value = fields[attribute]
            if value is not None:
                family = CounterMetricFamily if counter else GaugeMetricFamily
                yield family(name, help_text, value=value)
        if transport_stats.registered is not None:
            yield GaugeMetricFamily("ossensor_transport_registered",
                                    "1 while registered with the vSensor.",
                                    value=int(transport_stats.registered))
        yield InfoMetricFamily("ossensor_filter", "The kernel filter in force.",
                               value={"version": own.filter_version,
                                      "transport": transport.name})
        yield from plugin_families(sensor.prepared.plugins.hook.ossensor_metrics(
            config=sensor.config))


def plugin_families(results: list[Sequence[MetricSample] | None]) -> Iterator[Any]:
    """The samples plugins returned from ``ossensor_metrics``, as metric families: one family
    per name (a counter is shown with ``_total``, as prometheus_client does), its samples
    labelled as given."""
    families: dict[str, Any] = {}
    for samples in results:
        for sample in samples or ():
            family = families.get(sample.name)
            if family is None:
                kind = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                family = families[sample.name] = kind(sample.name, sample.help,
                                                      labels=sorted(sample.labels))
            family.add_metric([sample.labels[k] for k in sorted(sample.labels)], sample.value)
    yield from families.values()


class MetricsServer:
    """The ``/metrics`` endpoint, on the sensor's event loop."""

    def __init__(self, sensor: Sensor, address: str) -> None:
        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SensorCollector(sensor))
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        """Listen; a port that cannot be bound stops start-up (ConfigError)."""
        app = web.Application()
        app.router.add_get(PATH, self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError([f"{VARIABLE}: cannot listen on {self.host}:{self.port} "
                               f"({exc.strerror or exc})"]) from exc
        log.info("metrics on http://%s:%d%s", self.host, self.port, PATH)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
