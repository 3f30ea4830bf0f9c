"""The core's own hook implementations: defaults that any plugin can override, and the
settings that belong to the core rather than to one plugin (the vSensor connection's TLS,
which the transport, Antigena and diagnose all use)."""

from __future__ import annotations

from ossensor_core.client.tls import connection_settings
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.settings import SettingsGroup
from ossensor_core.plugin import hookimpl
from ossensor_core.wire.chunk import ChunkCodec


@hookimpl
def ossensor_settings() -> SettingsGroup:
    """``VSENSOR_CA_FILE``, ``VSENSOR_TLS_FINGERPRINT``, ``VSENSOR_TLS_VERIFY``."""
    return connection_settings()


@hookimpl(trylast=True)
def ossensor_chunk_encoder(config: SensorConfig) -> ChunkCodec:
    return ChunkCodec()
