"""The core's own hook implementations: defaults that any plugin can override."""

from __future__ import annotations

from .chunk import ChunkCodec
from .config import SensorConfig
from .plugin import hookimpl


@hookimpl(trylast=True)
def ossensor_chunk_encoder(config: SensorConfig) -> ChunkCodec:
    return ChunkCodec()
