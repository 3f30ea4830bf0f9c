"""What a plugin author imports: ``from ossensor_core.plugin import hookimpl``.

A complete minimal plugin, a user-space filter that drops packets longer than a limit::

    # my_package/maxlen.py
    from ossensor_core.plugin import hookimpl, PacketBatch, Setting, SettingsGroup

    class MaxLength:
        name = "maxlen"

        def __init__(self, limit: int) -> None:
            self.limit = limit

        def filter(self, batch: PacketBatch) -> PacketBatch:
            keep = [i for i, h in enumerate(batch.headers()) if h[4] <= self.limit]
            return batch if len(keep) == len(batch) else batch.select(keep)

    @hookimpl
    def ossensor_settings():
        return SettingsGroup("maxlen", [Setting("limit", int, 1514, "Largest frame kept.",
                                                 minimum=1)])

    @hookimpl
    def ossensor_packet_filter(config):
        return MaxLength(config.plugin("maxlen").limit)   # OSSENSOR_MAXLEN_LIMIT

and its entry point, in the package's ``pyproject.toml``::

    [project.entry-points."ossensor.plugins"]
    maxlen = "my_package.maxlen"

Then ``OSSENSOR_PLUGINS=maxlen`` loads it. Capture backends register in ``ossensor.capture`` and
are chosen with ``OSSENSOR_CAPTURE_BACKEND``; transports in ``ossensor.transport`` and
``OSSENSOR_TRANSPORT``. See ``docs/architecture.md`` for the hooks and the lifecycle.
"""

from __future__ import annotations

import pluggy

from ossensor_core.capture.batch import Packet, PacketBatch
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.errors import CaptureError, ConfigError, FilterError, OssensorError, PluginError, \
    TransportError
from ossensor_core.hookspecs import PROJECT
from ossensor_core.node.interfaces import Decision, Interface, InterfaceEvent
from ossensor_core.pipeline.contracts import (CaptureBackend, CaptureSource, CaptureStats, Chunk, ChunkEncoder,
                        PacketFilter, ResponseEnforcer, SensorControl, Transport)
from ossensor_core.pipeline.settings import PluginSettings, Setting, SettingsGroup

hookimpl = pluggy.HookimplMarker(PROJECT)

#: Entry point groups: one plugin of each of the first two is chosen by name; the third holds
#: the plugins listed in ``OSSENSOR_PLUGINS``.
CAPTURE_GROUP = "ossensor.capture"
TRANSPORT_GROUP = "ossensor.transport"
PLUGIN_GROUP = "ossensor.plugins"

__all__ = [
    "CAPTURE_GROUP", "PLUGIN_GROUP", "TRANSPORT_GROUP", "CaptureBackend", "CaptureError",
    "CaptureSource", "CaptureStats", "Chunk", "ChunkEncoder", "ConfigError", "Decision",
    "FilterError", "Interface", "InterfaceEvent", "OssensorError", "Packet", "PacketBatch",
    "PacketFilter", "PluginError", "PluginSettings", "ResponseEnforcer", "SensorConfig",
    "SensorControl",
    "Setting", "SettingsGroup", "Transport", "TransportError", "hookimpl",
]
