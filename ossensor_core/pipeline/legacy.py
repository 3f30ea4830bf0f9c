"""Plugins written against the old structural contracts keep working.

Before the contracts became base classes (``contracts.py``), a transport, a chunk encoder or a
response enforcer was any object with the right methods. Such an object is adapted once, where
the hook returns it: a small wrapper that subclasses the base class, delegates the required
members and takes the base class's defaults for the rest, with a ``DeprecationWarning`` naming
the plugin's class. Call sites then read every member without probing.

:func:`register` adds the adapting hook wrappers to a plugin manager (``loading.py`` does, for
the sensor and the testing kit alike).
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

import pluggy

from ossensor_core.capture.batch import PacketBatch
from ossensor_core.hookspecs import PROJECT
from ossensor_core.pipeline.contracts import (Chunk, ChunkEncoder, ResponseEnforcer,
                                              SensorControl, Transport)

if TYPE_CHECKING:
    from ossensor_core.pipeline.config import SensorConfig

hookimpl = pluggy.HookimplMarker(PROJECT)

#: The name the adapting wrappers are registered under.
PLUGIN_NAME = "core:contracts"


def _warn(obj: object, contract: type) -> None:
    kind = type(obj)
    warnings.warn(f"{kind.__module__}.{kind.__qualname__} does not subclass "
                  f"{contract.__module__}.{contract.__qualname__}; it is adapted for now, "
                  f"subclass ossensor_core.plugin.{contract.__qualname__} instead",
                  DeprecationWarning, stacklevel=2)


class LegacyTransport(Transport):
    """A transport that implements the old ``Transport`` protocol without subclassing it."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped
        self.name = str(wrapped.name)  # type: ignore[attr-defined]

    async def start(self, control: SensorControl) -> None:
        await self.wrapped.start(control)  # type: ignore[attr-defined]

    async def send(self, chunk: Chunk) -> None:
        await self.wrapped.send(chunk)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.wrapped.aclose()  # type: ignore[attr-defined]


class LegacyEncoder(ChunkEncoder):
    """An encoder of the old protocol: ``encode(chunk)`` writes version 1."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped
        self.media_type = str(wrapped.media_type)  # type: ignore[attr-defined]

    def encode(self, chunk: Chunk, version: int = 1) -> bytes:
        if version != 1:
            raise ValueError(f"{type(self.wrapped).__qualname__} writes ossensor-chunk v1 only, "
                             f"not v{version}")
        return bytes(self.wrapped.encode(chunk))  # type: ignore[attr-defined]

    def decode(self, payload: bytes) -> Chunk:
        return self.wrapped.decode(payload)  # type: ignore[attr-defined,no-any-return]


class LegacyEnforcer(ResponseEnforcer):
    """A response enforcer of the old protocol (``name`` and ``enforce`` only)."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped
        self.name = str(wrapped.name)  # type: ignore[attr-defined]

    def enforce(self, batch: PacketBatch, actions: Sequence[object]) -> int:
        return int(self.wrapped.enforce(batch, actions))  # type: ignore[attr-defined]


def adopt_transport(transport: object) -> Transport:
    """``transport`` as a :class:`Transport` (wrapped, with a warning, when it is not one)."""
    if isinstance(transport, Transport):
        return transport
    _warn(transport, Transport)
    return LegacyTransport(transport)


def adopt_encoder(encoder: object) -> ChunkEncoder:
    """``encoder`` as a :class:`ChunkEncoder` (wrapped, with a warning, when it is not one)."""
    if isinstance(encoder, ChunkEncoder):
        return encoder
    _warn(encoder, ChunkEncoder)
    return LegacyEncoder(encoder)


def adopt_enforcer(enforcer: object) -> ResponseEnforcer:
    """``enforcer`` as a :class:`ResponseEnforcer` (wrapped, with a warning, when not one)."""
    if isinstance(enforcer, ResponseEnforcer):
        return enforcer
    _warn(enforcer, ResponseEnforcer)
    return LegacyEnforcer(enforcer)


class ContractAdapters:
    """Hook wrappers, innermost (``trylast``): every later wrapper and every caller sees
    objects that subclass the contracts."""

    @hookimpl(wrapper=True, trylast=True)
    def ossensor_chunk_encoder(self, config: SensorConfig) -> Generator[
            None, ChunkEncoder | None, ChunkEncoder | None]:
        encoder = yield
        return None if encoder is None else adopt_encoder(encoder)

    @hookimpl(wrapper=True, trylast=True)
    def ossensor_transport(self, config: SensorConfig, encoder: ChunkEncoder) -> Generator[
            None, Transport | None, Transport | None]:
        transport = yield
        return None if transport is None else adopt_transport(transport)

    @hookimpl(wrapper=True, trylast=True)
    def ossensor_response_enforcer(self, config: SensorConfig) -> Generator[
            None, list[ResponseEnforcer | None], list[ResponseEnforcer | None]]:
        enforcers = yield
        return [None if e is None else adopt_enforcer(e) for e in enforcers]


def register(manager: pluggy.PluginManager) -> None:
    """Add the adapting wrappers to ``manager``."""
    manager.register(ContractAdapters(), name=PLUGIN_NAME)
