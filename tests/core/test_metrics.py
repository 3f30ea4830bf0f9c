"""The /metrics endpoint of a sensor: its own counters (``Sensor.stats``), the transport's
(``Transport.stats``) and the series plugins contribute (``ossensor_metrics``)."""

from __future__ import annotations

import asyncio
import warnings

import aiohttp
import pytest

from ossensor_core.ops.metrics import MetricsServer
from ossensor_core.pipeline.sensor import Sensor
from ossensor_core.pipeline.startup import Prepared
from ossensor_core.plugin import Chunk, SensorControl, Transport, TransportStats, hookimpl
from ossensor_core.testing import FakeCaptureBackend, build_pipeline
from tests.fixtures.plugins import metrics_sample
from tests.helpers.vsensor_process import free_port


class CountingTransport(Transport):
    name = "counting"

    async def start(self, control: SensorControl) -> None:
        pass

    async def send(self, chunk: Chunk) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def stats(self) -> TransportStats:
        return TransportStats(chunks_sent=3, queued_chunks=1, registered=False)


class OldTransport:
    """A transport of the old structural contract: no base class, counters as attributes."""

    name = "old"
    chunks_sent = 99

    async def start(self, control: SensorControl) -> None:
        pass

    async def send(self, chunk: Chunk) -> None:
        pass

    async def aclose(self) -> None:
        pass


class Stages:
    def __init__(self, transport: object) -> None:
        self.transport = transport

    @hookimpl
    def ossensor_capture_backend(self, config):
        return FakeCaptureBackend()

    @hookimpl
    def ossensor_transport(self, config, encoder):
        return self.transport


def scrape(plugins: list[object]) -> dict[str, float]:
    pipeline = build_pipeline(plugins)
    prepared = Prepared(pipeline.config, pipeline.plugins, None, [], [], None, "")  # type: ignore[arg-type]

    async def run() -> str:
        sensor = Sensor(prepared)
        port = free_port()
        server = MetricsServer(sensor, f"127.0.0.1:{port}")
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    return await response.text()
        finally:
            await server.aclose()

    text = asyncio.run(run())
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_a_plugin_contributes_series_through_ossensor_metrics():
    samples = scrape([Stages(CountingTransport()), metrics_sample])
    assert samples["fixture_widgets_total"] == 7
    assert samples['fixture_depth{side="left"}'] == 2.5
    assert samples['fixture_depth{side="right"}'] == 4
    # the sensor's own counters and the transport's (fields that are None have no series)
    assert samples["ossensor_chunks_total"] == 0 and samples["ossensor_capturing_interfaces"] == 0
    assert samples["ossensor_transport_chunks_sent_total"] == 3
    assert samples["ossensor_transport_queued_chunks"] == 1
    assert samples["ossensor_transport_registered"] == 0
    assert "ossensor_transport_bytes_sent_total" not in samples
    # no plugin named antigena is loaded: none of its series
    assert not any(name.startswith("ossensor_antigena") for name in samples)


def test_a_transport_of_the_old_contract_is_adapted_once_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"test_metrics\.OldTransport does not subclass"):
        samples = scrape([Stages(OldTransport())])
    # adapted: the defaults of Transport apply (no counters, nothing to wait for)
    assert not any(name.startswith("ossensor_transport_") for name in samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scrape([Stages(CountingTransport())])  # a subclass is not adapted
