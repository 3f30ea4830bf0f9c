"""``ossensor run``: the sensor as a process, with its signals, health status and metrics."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from ossensor_core.ops.health import keep_status
from ossensor_core.pipeline.sensor import Sensor
from ossensor_core.pipeline.startup import Prepared
from ossensor_core.runtime.memory import tidy_periodically

if TYPE_CHECKING:
    from ossensor_core.ops.metrics import MetricsServer


async def run_sensor(prepared: Prepared, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT (or ``stop`` is set), then flush and return."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sensor = Sensor(prepared)
    metrics: MetricsServer | None = None
    try:
        if prepared.config.metrics_address:  # before anything starts: a busy port stops start-up
            # Imported only when asked for: prometheus_client costs memory on every node.
            from ossensor_core.ops.metrics import MetricsServer

            metrics = MetricsServer(sensor, prepared.config.metrics_address)
            await metrics.start()
        await sensor.run(stop, companions=[keep_status(sensor), tidy_periodically()])
    finally:
        if metrics is not None:
            await metrics.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
