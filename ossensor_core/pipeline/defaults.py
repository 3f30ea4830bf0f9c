"""The core's own hook implementations: defaults that any plugin can override."""

from __future__ import annotations

from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.plugin import hookimpl


@hookimpl(trylast=True)
def ossensor_chunk_encoder(config: SensorConfig) -> ChunkCodec:
    return ChunkCodec()
