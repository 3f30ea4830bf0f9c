"""The core's own hook implementations: defaults that any plugin can override
(``OSSENSOR_DISABLE_PLUGINS=core`` leaves them out)."""

from __future__ import annotations

from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.hookspecs import hookimpl
from ossensor_core.wire.chunk import ChunkCodec


@hookimpl(trylast=True)
def ossensor_chunk_encoder(config: SensorConfig) -> ChunkCodec:
    return ChunkCodec()
