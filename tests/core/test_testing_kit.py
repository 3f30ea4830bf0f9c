"""ossensor_core.testing: the fake capture source, the recording transport, build_pipeline.

These run the real stages (plugins, settings, filters, the file transport, the encoder) on
packets given in the test; capture itself is covered by the real-capture tests in tests/e2e.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import struct
import time

import pytest

from ossensor_core.capture.batch import Packet
from ossensor_core.errors import ConfigError
from ossensor_core.node.interfaces import Decision
from ossensor_core.wire.pcapng import PcapngWriter
from ossensor_core.plugin import SettingsGroup, Setting, hookimpl
from ossensor_core.testing import (FakeCaptureBackend, FakeCaptureSource, RecordingTransport,
                                   build_pipeline, fake_interface, read_capture_file)
from ossensor_plugins import transport_file
from tests.fixtures.plugins import maxlen


def udp_frame(n: int, size: int = 20, src: str = "192.0.2.1", dst: str = "192.0.2.2",
              sport: int = 40000, dport: int = 7000, ttl: int = 64,
              mac: bytes = b"\x02" * 6 + b"\x04" * 6) -> bytes:
    """An Ethernet/IPv4/UDP frame numbered ``n`` (IP checksum left 0; also used by the filter
    tests, which change addresses, ports, TTL and MACs)."""
    payload = n.to_bytes(4, "big") + bytes(size)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), n & 0xFFFF, 0, ttl, 17,
                     ttl * 7, socket.inet_aton(src), socket.inet_aton(dst))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return mac + b"\x08\x00" + ip + udp + payload


def udp6_frame(n: int, src: str = "2001:db8::1", dst: str = "2001:db8::2", sport: int = 40000,
               dport: int = 7000, hop_limit: int = 64,
               mac: bytes = b"\x02" * 6 + b"\x04" * 6) -> bytes:
    """An Ethernet/IPv6/UDP frame numbered ``n``."""
    payload = n.to_bytes(4, "big") + bytes(16)
    ip = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(payload), 17, hop_limit,
                     socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return mac + b"\x86\xdd" + ip + udp + payload


def cost_per_packet(packet_filter, batches) -> tuple[float, float]:
    """Seconds per packet of ``packet_filter`` over ``batches``, and of the pcapng writer's
    per-packet loop over the same batches (a yardstick on a noisy machine)."""
    from ossensor_core.wire.pcapng import epb_parts

    packets = sum(b.count for b in batches)
    started = time.perf_counter()
    for batch in batches:
        packet_filter.filter(batch)
    filtering = (time.perf_counter() - started) / packets
    started = time.perf_counter()
    for batch in batches:
        b"".join(epb_parts(batch, 0))
    return filtering, (time.perf_counter() - started) / packets


def test_fake_source_is_readable_exactly_while_packets_wait():
    source = FakeCaptureSource([udp_frame(n) for n in range(10)], "pod0", batch_packets=4)
    assert select.select([source.fileno()], [], [], 0)[0]
    batches = source.read()
    assert [b.count for b in batches] == [4, 4, 2]
    assert {b.interface for b in batches} == {"pod0"}
    assert not select.select([source.fileno()], [], [], 0)[0]
    assert source.read() == [] and source.exhausted
    assert source.stats().packets == 10
    source.close()
    source.close()  # idempotent


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_fake_source_replays_a_capture_file_with_its_timestamps(tmp_path, kind):
    frames = [(1_700_000_000_000_000_000 + n * 1_000_000, 1514 if n == 2 else 0, udp_frame(n))
              for n in range(5)]
    frames = [(ts, wire or len(frame), frame) for ts, wire, frame in frames]
    path = tmp_path / f"in.{kind}"
    if kind == "pcap":
        # Classic pcap, microseconds: global header, then a record header per packet.
        parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
        for ts, wire, frame in frames:
            parts += [struct.pack("<IIII", ts // 10**9, ts % 10**9 // 1000, len(frame), wire),
                      frame]
        path.write_bytes(b"".join(parts))
    else:
        with open(path, "wb") as out:
            source = FakeCaptureSource(frames, "eth9")
            PcapngWriter(out, 1).write_batch(source.read()[0])
    linktype, read = read_capture_file(path)
    assert linktype == 1
    assert read == frames
    source = FakeCaptureSource.from_file(path, "eth9")
    assert [(p.timestamp_ns, p.wire_length, p.data) for b in source.read()
            for p in b.packets()] == frames


def test_a_filter_plugin_with_its_settings():
    pipeline = build_pipeline([maxlen], {"OSSENSOR_MAXLEN_LIMIT": "60"})
    assert pipeline.config.plugin("maxlen").limit == 60
    source = FakeCaptureSource([udp_frame(n, size) for n, size in enumerate([10, 100, 12])])
    chunks = pipeline.run_sync([source])
    assert len(chunks) == 1 and chunks[0].packets == 2
    assert isinstance(pipeline.transport, RecordingTransport) and pipeline.transport.closed
    assert [f[42:46] for f in pipeline.transport.frames()] == [b"\0\0\0\0", b"\0\0\0\2"]


def test_plugin_problems_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        build_pipeline([maxlen], {"OSSENSOR_MAXLEN_LIMIT": "13", "OSSENSOR_DEBUG": "9"})
    assert "OSSENSOR_MAXLEN_LIMIT: 13 is unlucky" in caught.value.problems
    assert any(p.startswith("OSSENSOR_DEBUG") for p in caught.value.problems)


def test_through_the_file_transport_into_pcapng(tmp_path):
    """A capture file in, the real file transport out: the same packets, stamps and lengths."""
    frames = [(1_700_000_000_123_456_789 + n * 1000, len(udp_frame(n)), udp_frame(n))
              for n in range(300)]
    pipeline = build_pipeline([transport_file], {"OSSENSOR_TRANSPORT": "file",
                                                 "OSSENSOR_OUTPUT_DIR": str(tmp_path / "out")})
    assert type(pipeline.transport).__name__ == "FileTransport"
    pipeline.run_sync([FakeCaptureSource(frames, "eth1", batch_packets=64)])
    (stored,) = sorted((tmp_path / "out").glob("*.pcapng"))
    assert read_capture_file(stored) == (1, frames)


class EveryHook:
    """Implements every hook and records the calls, to prove where the kit calls each."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.backend = FakeCaptureBackend({"pod1": [udp_frame(1), udp_frame(2)]})

    @hookimpl
    def ossensor_settings(self):
        self.calls.append("ossensor_settings")
        return SettingsGroup("every", [Setting("tag", str, "x", "A tag.")])

    @hookimpl
    def ossensor_configure(self, config):
        self.calls.append("ossensor_configure")

    @hookimpl
    def ossensor_interface_decision(self, config, interface, decision):
        self.calls.append("ossensor_interface_decision")
        if interface.name.startswith("pod"):
            return Decision(interface, True, "a pod interface")
        return None

    @hookimpl
    def ossensor_capture_backend(self, config):
        self.calls.append("ossensor_capture_backend")
        return self.backend

    @hookimpl
    def ossensor_kernel_filter(self, config):
        self.calls.append("ossensor_kernel_filter")
        return "udp"

    @hookimpl
    def ossensor_packet_filter(self, config):
        self.calls.append("ossensor_packet_filter")
        return None

    @hookimpl
    def ossensor_chunk_encoder(self, config):
        self.calls.append("ossensor_chunk_encoder")
        return None  # the core's default follows

    @hookimpl
    def ossensor_transport(self, config, encoder):
        self.calls.append("ossensor_transport")
        return None

    @hookimpl
    def ossensor_response_enforcer(self, config):
        self.calls.append("ossensor_response_enforcer")

    @hookimpl
    def ossensor_startup(self, config):
        self.calls.append("ossensor_startup")

    @hookimpl
    def ossensor_interface_event(self, config, event):
        self.calls.append(f"ossensor_interface_event {event.kind} {event.interface.name}")

    @hookimpl
    def ossensor_capture_stats(self, config, interface, stats):
        self.calls.append(f"ossensor_capture_stats {interface} {stats.packets}")

    @hookimpl
    def ossensor_chunk_sent(self, config, chunk):
        self.calls.append(f"ossensor_chunk_sent {chunk.packets}")

    @hookimpl
    def ossensor_shutdown(self, config):
        self.calls.append("ossensor_shutdown")


def test_every_hook_is_called_in_lifecycle_order(caplog):
    plugin = EveryHook()
    with caplog.at_level(logging.WARNING, logger="ossensor_core.pipeline.loading"):
        pipeline = build_pipeline([plugin], {"BPF": "port 7000",
                                             "NETWORK_DEVICE_EXCLUDELIST": "^pod"}, trace=True)
    assert pipeline.config.plugin("every").tag == "x"
    assert pipeline.backend is plugin.backend
    assert pipeline.encoder.media_type.startswith("application/vnd.ossensor.chunk")
    assert pipeline.decide(fake_interface("pod1")).selected  # the plugin overrides the list
    assert not pipeline.decide(fake_interface("lo", arphrd=772)).selected
    assert pipeline.kernel_filter() == "(udp) and (port 7000)"
    source = pipeline.open("pod1")
    assert plugin.backend.opened[0].programs  # the compiled kernel filter was handed over
    pipeline.run_sync([source])
    assert plugin.calls == [
        "ossensor_settings", "ossensor_configure", "ossensor_chunk_encoder",
        "ossensor_transport", "ossensor_capture_backend", "ossensor_packet_filter",
        "ossensor_interface_decision", "ossensor_interface_decision", "ossensor_kernel_filter",
        "ossensor_kernel_filter", "ossensor_interface_event added pod1",
        "ossensor_response_enforcer", "ossensor_startup", "ossensor_capture_stats pod1 2",
        "ossensor_interface_event removed pod1", "ossensor_chunk_sent 2", "ossensor_shutdown",
    ]
    traced = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(r"hook trace: +ossensor_settings \[hook\]", traced)


def test_recording_transport_and_control():
    transport = RecordingTransport()
    pipeline = build_pipeline([], transport=transport)
    assert pipeline.transport is transport and pipeline.backend is None
    packets = [Packet(10**18 + n, 100, udp_frame(n)) for n in range(3)]
    pipeline.run_sync([FakeCaptureSource(packets, "veth7")])
    assert transport.started and transport.control.captured_interfaces()[0].name == "veth7"
    assert transport.packets() == packets


def test_filters_apply_in_plugin_order():
    """The spec's order (OSSENSOR_PLUGINS), not pluggy's call order (last registered first)."""
    from ossensor_plugins import filter_dedup, filter_slice

    environ = {"OSSENSOR_SLICE_BYTES": "64"}
    assert [f.name for f in build_pipeline([filter_dedup, filter_slice], environ).filters] == \
        ["dedup", "slice"]
    assert [f.name for f in build_pipeline([filter_slice, filter_dedup], environ).filters] == \
        ["slice", "dedup"]


def test_the_kit_cuts_chunks_as_the_sensor_does():
    """The kit runs the sensor's own Chunker: cut by OSSENSOR_CHUNK_BYTES, consecutive
    sequence numbers, and the interface table with each open capture's kernel counters."""
    from ossensor_core.pipeline.chunker import Chunker
    from ossensor_core.plugin import InterfaceCounters

    pipeline = build_pipeline([], {"OSSENSOR_CHUNK_BYTES": "4096"})
    assert isinstance(pipeline.chunker, Chunker)
    source = FakeCaptureSource([udp_frame(n, 200) for n in range(40)], fake_interface("eth3", 7),
                               batch_packets=8)
    chunks = pipeline.run_sync([source])
    # five batches of eight records (2,432 bytes each): two reach 4,096 bytes, the last is
    # cut when the source is drained
    assert [c.packets for c in chunks] == [16, 16, 8]
    assert [len(c.batches) for c in chunks] == [2, 2, 1]
    assert [c.sequence for c in chunks] == [1, 2, 3] and pipeline.sequence == 3
    assert [c.interfaces for c in chunks] == [(InterfaceCounters("eth3", 7, 1, 40, 0),)] * 3
    assert pipeline.transport.chunks == chunks
