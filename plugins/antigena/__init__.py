"""Antigena (``ossensor_plugins.antigena``): response actions from the vSensor, enforced here.

Loaded by default while ``ANTIGENA_ENABLED`` is true (entry point group ``ossensor.antigena``;
``OSSENSOR_DISABLE_PLUGINS=antigena`` leaves it out). At start-up it opens a websocket to the
vSensor (signed like every sensor request), receives block actions, watches for their traffic on
a socket of its own and hands each segment to every enforcer that plugins return from
``ossensor_response_enforcer`` (its own, TCP resets, first). Every ``ANTIGENA_TIME_PERIOD``
seconds it reports what each action did. With ``ANTIGENA_ENABLED=false`` it is not loaded: no
websocket, no packet injected. See ``docs/antigena.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Sequence
from typing import Any

from ossensor_core.client import AiohttpTls, VSensorTls
from ossensor_core.errors import ConfigError, TransportError
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.contracts import MetricSample  # not yet in ossensor_core.plugin
from ossensor_core.plugin import (ResponseEnforcer, SensorControl, Setting, SettingsGroup,
                                  hookimpl)

from .resets import ResetEnforcer
from .service import Antigena

log = logging.getLogger("ossensor_plugins.antigena")

NAME = "antigena"


def tls_for(config: SensorConfig) -> AiohttpTls:
    """The vSensor TLS the core's settings give (``VSENSOR_CA_FILE``, ``VSENSOR_TLS_FINGERPRINT``,
    ``VSENSOR_TLS_VERIFY``), whichever transport is loaded."""
    try:
        return VSensorTls.from_config(config).for_aiohttp()
    except TransportError as exc:
        raise ConfigError([f"VSENSOR_CA_FILE: cannot load it for Antigena "
                           f"({exc.__cause__ or exc})"]) from exc
    except ValueError as exc:  # start-up refuses a malformed pin first; a hand-built config
        raise ConfigError([f"VSENSOR_TLS_FINGERPRINT: {exc}"]) from exc


class AntigenaPlugin:
    """The hook implementations; one instance per process (the entry point's object)."""

    def __init__(self) -> None:
        self.enforcers: list[ResponseEnforcer] | None = None
        self.service: Antigena | None = None
        self.task: asyncio.Task[None] | None = None

    @hookimpl
    def ossensor_settings(self) -> SettingsGroup:
        return SettingsGroup(NAME, [
            Setting("resets_per_second", float, 200.0,
                    "Most TCP resets sent per second (each blocked segment takes two).",
                    positive=True, maximum=1_000_000),
            Setting("reconnect_max_seconds", float, 10.0,
                    "Longest wait between attempts to reopen the websocket to the vSensor.",
                    positive=True, maximum=3600),
            Setting("reports_kept", int, 1000,
                    "Reports kept while the vSensor is away (the oldest go first).", minimum=1,
                    maximum=1_000_000),
        ])

    @hookimpl
    def ossensor_configure(self, config: SensorConfig) -> None:
        """A CA file that cannot be loaded stops start-up, not the first connection."""
        if config.antigena_enabled:
            tls_for(config)

    @hookimpl(wrapper=True)
    def ossensor_response_enforcer(self, config: SensorConfig) -> Generator[
            None, list[ResponseEnforcer | None], list[ResponseEnforcer | None]]:
        """Put the reset enforcer first and remember every enforcer the plugins return."""
        others = yield
        if self.enforcers is None:
            settings = config.plugin(NAME)
            self.enforcers = [ResetEnforcer(settings.resets_per_second),
                              *(e for e in others if e is not None)]
        return [*self.enforcers]

    @hookimpl
    def ossensor_startup(self, config: SensorConfig, control: SensorControl) -> None:
        if not config.antigena_enabled:
            return
        settings = config.plugin(NAME)
        enforcers = self.enforcers
        if enforcers is None:  # the core did not ask for enforcers before start-up
            enforcers = [ResetEnforcer(settings.resets_per_second)]
        log.info("Antigena: enforcers %s; reports every %g s",
                 ", ".join(e.name for e in enforcers),
                 config.antigena_time_period)
        self.service = Antigena(host=config.vsensor_hostname, port=config.vsensor_port,
                                key=config.hmac_key, sensor=config.name, tls=tls_for(config),
                                period=config.antigena_time_period, enforcers=enforcers,
                                reconnect_max=settings.reconnect_max_seconds,
                                reports_kept=settings.reports_kept,
                                on_filters_changed=control.refresh_filters)
        self.task = asyncio.get_running_loop().create_task(self.service.run(), name="antigena")
        self.task.add_done_callback(_ended)

    @hookimpl
    def ossensor_metrics(self, config: SensorConfig) -> Sequence[MetricSample] | None:
        """Actions in force, the websocket's state and what the reset enforcers sent; nothing
        before start-up (or with Antigena off)."""
        service = self.service
        if service is None:
            return None
        resets = [e for e in service.enforcers if isinstance(e, ResetEnforcer)]
        return [
            MetricSample("ossensor_antigena_actions", "Antigena actions in force.",
                         len(service.actions)),
            MetricSample("ossensor_antigena_connected",
                         "1 while the Antigena websocket to the vSensor is open.",
                         int(service.ws is not None)),
            MetricSample("ossensor_antigena_actions_received",
                         "Antigena actions received (new or changed) since the start.",
                         service.actions_received, "counter"),
            MetricSample("ossensor_antigena_resets", "TCP resets sent.",
                         sum(e.resets_sent for e in resets), "counter"),
            MetricSample("ossensor_antigena_probes",
                         "Idle blocked connections of this host probed for their sequence "
                         "numbers.", sum(e.probes_sent for e in resets), "counter"),
            MetricSample("ossensor_antigena_resets_rate_limited",
                         "Resets not sent because of the rate limit.",
                         sum(e.rate_limited for e in resets), "counter"),
        ]

    @hookimpl
    def ossensor_shutdown(self, config: SensorConfig) -> None:
        if self.task is not None:
            self.task.cancel()


def _ended(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Antigena stopped: %r", task.exception())


plugin = AntigenaPlugin()
