"""Hook specifications: every stage of the sensor a plugin can provide or watch.

Hooks assemble the pipeline at start-up and announce events. They are never called per packet:
per-batch work goes through the objects that the factory hooks return (the contracts of
``pipeline/contracts.py``, all exported by ``ossensor_core.plugin``).
All hooks are synchronous; asynchronous work lives on the returned objects.

Lifecycle, in call order::

    ossensor_settings         declare settings (every plugin)           -> SettingsGroup
    ossensor_configure        check the parsed configuration            (every plugin)
    ossensor_interface_decision  override the selection of an interface (first result)
    ossensor_capture_backend  the capture backend                       (first result)
    ossensor_kernel_filter    parts of the kernel filter, AND-ed        (all results)
    ossensor_packet_filter    user-space batch filters, in plugin order (all results)
    ossensor_chunk_encoder    the chunk encoder                         (first result)
    ossensor_transport        the transport                             (first result)
    ossensor_response_enforcer  Antigena enforcement methods            (all results)
    ossensor_startup          the pipeline is assembled and about to run
      ossensor_interface_event   a capture opened, closed, went up or down
      ossensor_capture_stats     periodic kernel counters of one interface
      ossensor_chunk_sent        a chunk was accepted by the transport
      ossensor_metrics           values for /metrics, at each scrape
    ossensor_shutdown         captures closed, transport flushed

Outside a running sensor, ``ossensor diagnose`` calls::

    ossensor_diagnose         checks of what a plugin owns              (all results)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ossensor_core.pipeline.config import SensorConfig
    from ossensor_core.node.interfaces import Decision, Interface, InterfaceEvent
    from ossensor_core.pipeline.contracts import (CaptureBackend, CaptureStats, Chunk, ChunkEncoder, MetricSample, PacketFilter,
                            ResponseEnforcer, SensorControl, Transport)
    from ossensor_core.ops.diagnose.checks import Check, Context
    from ossensor_core.pipeline.settings import SettingsGroup

PROJECT = "ossensor"
hookspec = pluggy.HookspecMarker(PROJECT)
#: How a plugin marks its implementations (plugin authors import it from ossensor_core.plugin).
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Entry point groups: one plugin of each of the first two is chosen by name; the third holds
#: the plugins listed in ``OSSENSOR_PLUGINS``.
CAPTURE_GROUP = "ossensor.capture"
TRANSPORT_GROUP = "ossensor.transport"
PLUGIN_GROUP = "ossensor.plugins"


@hookspec
def ossensor_settings() -> SettingsGroup | None:
    """Declare this plugin's settings.

    Called once at start-up, before the configuration is parsed, on every loaded plugin.
    Returns a :class:`~ossensor_core.pipeline.settings.SettingsGroup` (the plugin's name and its
    :class:`~ossensor_core.pipeline.settings.Setting` list) or None. All results are collected; the values
    arrive as ``config.plugin(name)``, read from ``OSSENSOR_<PLUGIN>_<SETTING>``.
    """


@hookspec
def ossensor_configure(config: SensorConfig) -> None:
    """Check the parsed configuration; called once on every plugin after parsing.

    Raise :class:`~ossensor_core.errors.ConfigError` naming the variable to refuse it; every
    plugin's problems are reported together.
    """


@hookspec(firstresult=True)
def ossensor_interface_decision(config: SensorConfig, interface: Interface,
                                decision: Decision) -> Decision | None:
    """Interface discovery: override the core's include/exclude decision for one interface.

    Called for each interface at start-up and for each interface that appears later, never per
    packet. Return a new :class:`~ossensor_core.node.interfaces.Decision`, or None to keep the core's.
    The first non-None result wins.
    """


@hookspec(firstresult=True)
def ossensor_capture_backend(config: SensorConfig) -> CaptureBackend | None:
    """Capture backend: return the backend object. Only the plugin chosen by
    ``OSSENSOR_CAPTURE_BACKEND`` is loaded from the ``ossensor.capture`` group; first result."""


@hookspec
def ossensor_kernel_filter(config: SensorConfig) -> str | None:
    """Filtering, in the kernel: return a BPF expression that every captured packet must match,
    or None. All results are AND-ed with the user's ``BPF`` and compiled once per link type."""


@hookspec
def ossensor_packet_filter(config: SensorConfig) -> PacketFilter | None:
    """Filtering, in user space: return a :class:`~ossensor_core.pipeline.contracts.PacketFilter` or None.
    All results are applied to each batch in the order of ``OSSENSOR_PLUGINS``."""


@hookspec(firstresult=True)
def ossensor_chunk_encoder(config: SensorConfig) -> ChunkEncoder | None:
    """Chunk encoding: return the encoder the transport uses. First result; the core provides
    the default (``ossensor-chunk`` v1, zstd) with lower priority than any plugin."""


@hookspec(firstresult=True)
def ossensor_transport(config: SensorConfig, encoder: ChunkEncoder) -> Transport | None:
    """Transport: return the transport object (a
    :class:`~ossensor_core.pipeline.contracts.Transport`). Only the plugin chosen by
    ``OSSENSOR_TRANSPORT`` is loaded from the ``ossensor.transport`` group; first result. An
    object of the old structural contract is adapted once, with a DeprecationWarning."""


@hookspec
def ossensor_response_enforcer(config: SensorConfig) -> ResponseEnforcer | None:
    """Antigena actions: return a way to enforce response actions (for example TCP resets), or
    None. All results are used, in plugin order."""


@hookspec
def ossensor_startup(config: SensorConfig, control: SensorControl) -> None:
    """The pipeline is assembled; captures are about to open. Called once on every plugin.
    ``control`` is the running sensor (``SensorControl``): a plugin may keep it, e.g. to ask
    for the vSensor's filter again when the vSensor says it changed."""


@hookspec
def ossensor_interface_event(config: SensorConfig, event: InterfaceEvent) -> None:
    """A capture opened (``added``), closed (``removed``), or its interface went up or down."""


@hookspec
def ossensor_capture_stats(config: SensorConfig, interface: str, stats: CaptureStats) -> None:
    """Periodic kernel counters of one interface (every few seconds, not per packet)."""


@hookspec
def ossensor_chunk_sent(config: SensorConfig, chunk: Chunk) -> None:
    """The transport accepted ``chunk`` (stored or acknowledged)."""


@hookspec
def ossensor_metrics(config: SensorConfig) -> Sequence[MetricSample] | None:
    """Operations: this plugin's values for ``/metrics``, called at each scrape while
    ``OSSENSOR_METRICS_ADDRESS`` is set (never per packet). Return
    :class:`~ossensor_core.pipeline.contracts.MetricSample` values, or None; all results are
    shown. Must be cheap and do no I/O: it runs on the sensor's event loop."""


@hookspec
def ossensor_diagnose(config: SensorConfig, context: Context) -> Sequence[Check] | None:
    """``ossensor diagnose``: this plugin's checks of what it owns (the https transport checks
    the path to the vSensor), called once after the core's configuration, interface, privilege
    and kernel checks, and only when the plugins loaded. ``context`` holds what those found
    (interfaces, the kernel filter, variables whose value is invalid). Return
    :class:`~ossensor_core.ops.diagnose.checks.Check` values in report order, or None; all
    results are reported, in the order the plugins were loaded. The HMAC key must not appear in
    a check (the report masks it anyway)."""


@hookspec
def ossensor_shutdown(config: SensorConfig) -> None:
    """Captures are closed and the transport flushed; the process is about to exit."""
