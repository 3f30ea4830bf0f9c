"""A small third-party filter plugin with a setting, used by the plugin-loading tests."""

from __future__ import annotations

from ossensor_core.plugin import (ConfigError, PacketBatch, SensorConfig, Setting, SettingsGroup,
                                  hookimpl)


class MaxLength:
    name = "maxlen"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def filter(self, batch: PacketBatch) -> PacketBatch:
        keep = [i for i, header in enumerate(batch.headers()) if header[4] <= self.limit]
        return batch if len(keep) == len(batch) else batch.select(keep)


@hookimpl
def ossensor_settings() -> SettingsGroup:
    return SettingsGroup("maxlen", [
        Setting("limit", int, 1514, "Largest frame kept, in bytes.", minimum=1),
        Setting("mode", str, "drop", "What to do with longer frames.", choices=("drop",)),
    ])


@hookimpl
def ossensor_configure(config: SensorConfig) -> None:
    if config.plugin("maxlen").limit == 13:
        raise ConfigError(["OSSENSOR_MAXLEN_LIMIT: 13 is unlucky"])


@hookimpl
def ossensor_packet_filter(config: SensorConfig) -> MaxLength:
    return MaxLength(config.plugin("maxlen").limit)
