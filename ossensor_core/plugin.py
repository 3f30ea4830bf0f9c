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
``OSSENSOR_TRANSPORT``. See ``docs/plugins.md`` for the hooks and the contracts, and
``docs/architecture.md`` for the lifecycle.

Everything a plugin needs is importable from here (a third-party package imports nothing else
of ``ossensor_core``, and ``ossensor_core.testing`` in its tests): the hook marker and entry
point groups, settings, the contracts (``Transport``, ``ChunkEncoder`` and ``ResponseEnforcer``
are base classes to subclass), batches, kernel filter programs, the walk to a packet's network
header (:func:`network_header`) with the EtherType and link type constants, the vSensor client
(TLS, identity, registration, signed requests) for plugins that talk to the vSensor, the
``Check`` values of ``ossensor_diagnose``, and the errors.
"""

from __future__ import annotations

from ossensor_core.capture.batch import TPACKET3_HDR, TPACKET_ALIGNMENT, Packet, PacketBatch
from ossensor_core.capture.bpf import BpfProgram, compile_filter
from ossensor_core.capture.headers import (ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP,
                                           ETH_P_IPV6, VLAN_TPIDS, network_header)
from ossensor_core.client import (INSTANCE_FILE, AiohttpTls, VSensorTls, base_url, client_context,
                                  load_instance, new_instance, normalise_fingerprint,
                                  read_instance, registration_body, signed_headers, tls_setting)
from ossensor_core.errors import (CaptureError, ConfigError, FilterError, OssensorError,
                                  PluginError, TransportError)
from ossensor_core.hookspecs import CAPTURE_GROUP, PLUGIN_GROUP, PROJECT, TRANSPORT_GROUP, hookimpl
from ossensor_core.node.interfaces import Decision, Interface, InterfaceEvent
from ossensor_core.ops.diagnose.checks import Check, Context
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.contracts import (CaptureBackend, CaptureSource, CaptureStats, Chunk,
                                              ChunkEncoder, InterfaceCounters, MetricSample,
                                              PacketFilter, ResponseEnforcer, SensorControl,
                                              Transport, TransportStats)
from ossensor_core.pipeline.settings import PluginSettings, Setting, SettingsGroup, split_words
from ossensor_core.wire.names import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_RAW, SNAPLEN


__all__ = [
    # plugin registration
    "CAPTURE_GROUP", "PLUGIN_GROUP", "TRANSPORT_GROUP", "hookimpl",
    # configuration
    "PluginSettings", "SensorConfig", "Setting", "SettingsGroup", "split_words",
    # contracts and the values they exchange
    "CaptureBackend", "CaptureSource", "CaptureStats", "Chunk", "ChunkEncoder",
    "InterfaceCounters", "MetricSample", "PacketFilter", "ResponseEnforcer", "SensorControl",
    "Transport", "TransportStats",
    # interfaces
    "Decision", "Interface", "InterfaceEvent",
    # packets: batches, kernel filters, headers, link types
    "BpfProgram", "ETH_P_8021AD", "ETH_P_8021Q", "ETH_P_ARP", "ETH_P_IP", "ETH_P_IPV6",
    "LINKTYPE_ETHERNET", "LINKTYPE_LINUX_SLL", "LINKTYPE_RAW", "Packet", "PacketBatch", "SNAPLEN",
    "TPACKET3_HDR", "TPACKET_ALIGNMENT", "VLAN_TPIDS", "compile_filter", "network_header",
    # talking to the vSensor (TLS, identity, registration, signed requests)
    "INSTANCE_FILE", "AiohttpTls", "VSensorTls", "base_url", "client_context", "load_instance",
    "new_instance", "normalise_fingerprint", "read_instance", "registration_body",
    "signed_headers", "tls_setting",
    # diagnose checks (ossensor_diagnose)
    "Check", "Context",
    # errors
    "CaptureError", "ConfigError", "FilterError", "OssensorError", "PluginError",
    "TransportError",
]
