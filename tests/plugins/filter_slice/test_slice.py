"""The ``slice`` filter: first N bytes of each packet, first N packets of each flow.

Unit tests run the plugin through ossensor_core.testing (settings, configure, the filter, the
core's chunk encoder); one end-to-end run captures real traffic in a namespace with
``OSSENSOR_PLUGINS=slice`` and reads the stored pcapng back.
"""

from __future__ import annotations

import sys
import time

import pytest

from ossensor_core.errors import ConfigError
from ossensor_core.testing import FakeCaptureSource, build_pipeline, read_capture_file
from ossensor_plugins import filter_slice
from tests.helpers.cli import ossensor
from tests.helpers.sensor import SENDER, Sensor, numbered, sensor_env
from tests.helpers.netns import veth_pair
from tests.core.test_testing_kit import cost_per_packet, udp6_frame, udp_frame


def sliced(frames, **settings: str):
    environ = {f"OSSENSOR_SLICE_{k.upper()}": v for k, v in settings.items()}
    pipeline = build_pipeline([filter_slice], {"OSSENSOR_PLUGINS": "slice", **environ})
    source = FakeCaptureSource(frames, batch_packets=7)
    pipeline.run_sync([source])
    return pipeline


def test_first_bytes_kept_with_the_original_lengths():
    frames = [udp_frame(n, size) for n, size in enumerate([0, 10, 50, 300, 1400, 22])]
    pipeline = sliced(frames, bytes="64")
    packets = pipeline.transport.packets()
    assert [p.data for p in packets] == [f[:64] for f in frames]
    assert [p.wire_length for p in packets] == [len(f) for f in frames]
    (chunk,) = pipeline.transport.chunks
    # The truncated records are a valid batch for the wire format, too.
    decoded = pipeline.encoder.decode(pipeline.encoder.encode(chunk))
    assert [p for b in decoded.batches for p in b.packets()] == packets


def test_whole_batch_returned_when_nothing_is_longer():
    source = FakeCaptureSource([udp_frame(n) for n in range(5)])
    (batch,) = source.read()
    assert filter_slice.Slice(snap_bytes=1000).filter(batch) is batch


def test_first_packets_of_each_flow_both_directions_together():
    a_to_b = [udp_frame(n, sport=1111, dport=2222) for n in range(6)]
    b_to_a = [udp_frame(100 + n, src="192.0.2.2", dst="192.0.2.1", sport=2222, dport=1111)
              for n in range(6)]
    other_port = [udp_frame(200 + n, sport=1112, dport=2222) for n in range(4)]
    v6 = [udp6_frame(300 + n) for n in range(5)]
    arp = [b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28 + n) for n in range(3)]
    frames = [f for group in zip(a_to_b, b_to_a) for f in group] + other_port + v6 + arp
    pipeline = sliced(frames, packets="3")
    kept = pipeline.transport.frames()
    assert kept == [a_to_b[0], b_to_a[0], a_to_b[1]] + other_port[:3] + v6[:3] + arp


def test_both_cuts_together_and_flow_memory_is_bounded():
    flows = [udp_frame(n, 400, sport=10000 + n) for n in range(40)] * 2
    frames = filter_slice.Slice(snap_bytes=50, flow_packets=1, max_flows=16)
    (batch,) = FakeCaptureSource(flows).read()
    out = frames.filter(batch)
    assert out.count == 40  # the first of each; the second packets are within the same batch
    assert all(len(p.data) == 50 and p.wire_length == len(flows[0]) for p in out.packets())
    assert len(frames.flows) == 20  # past max_flows (checked per batch), the oldest half goes


def test_cost_per_packet():
    """Micro-benchmark on 32 batches of 1024 UDP packets (600 bytes) in 500 flows (-s shows)."""
    frames = [udp_frame(n, 550, sport=10000 + n % 500) for n in range(1024 * 32)]
    batches = FakeCaptureSource(frames, batch_packets=1024).read()
    for label, cut in (("bytes=96", filter_slice.Slice(snap_bytes=96)),
                       ("packets=10", filter_slice.Slice(flow_packets=10))):
        per_packet, writer = cost_per_packet(cut, batches)
        print(f"\nslice {label}: {per_packet * 1e9:.0f} ns per packet; pcapng writing: "
              f"{writer * 1e9:.0f} ns per packet")
        assert per_packet < 20e-6  # a loose bound for a loaded 2-core CI machine


def test_refuses_to_load_without_a_cut():
    with pytest.raises(ConfigError, match="OSSENSOR_SLICE_BYTES or OSSENSOR_SLICE_PACKETS"):
        build_pipeline([filter_slice], {"OSSENSOR_PLUGINS": "slice"})
    with pytest.raises(ConfigError, match="OSSENSOR_SLICE_BYTES: '-1' is below the minimum 0"):
        build_pipeline([filter_slice], {"OSSENSOR_SLICE_BYTES": "-1",
                                        "OSSENSOR_SLICE_PACKETS": "2"})


def test_sensor_run_with_slice(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, OSSENSOR_PLUGINS="slice", OSSENSOR_SLICE_BYTES="60",
                         OSSENSOR_SLICE_PACKETS="5", BPF="udp")
        sensor = Sensor(rx, env, tmp_path)
        try:
            sensor.wait_for_log("capturing on rx0")
            for port in ("7100", "7101"):  # two flows of 300 datagrams, up to 700 bytes
                tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", port, "300")
            time.sleep(0.3)
            code, _ = sensor.terminate()
        finally:
            sensor.kill()
        assert code == 0, sensor.proc.stderr.read()
    stored = [p for path in sorted(sensor.out.glob("*.pcapng"))
              for p in read_capture_file(path)[1]]
    frames = [frame for _, _, frame in stored]
    assert len(stored) == 10 and all(len(f) <= 60 for f in frames)
    assert [wire for _, wire, _ in stored] == [42 + 8 + n % 700 for n in range(5)] * 2
    assert numbered(frames, 7100) == numbered(frames, 7101) == set(range(5))


def test_listed_with_their_settings(base_env):
    listing = ossensor(["plugins"], base_env).json()
    entries = {p["name"]: p for p in listing["plugin"]}
    assert entries["slice"]["hooks"] == ["ossensor_configure", "ossensor_packet_filter",
                                         "ossensor_settings"]
    assert [s["variable"] for s in entries["slice"]["settings"]] == [
        "OSSENSOR_SLICE_BYTES", "OSSENSOR_SLICE_PACKETS", "OSSENSOR_SLICE_MAX_FLOWS"]
    assert [s["variable"] for s in entries["dedup"]["settings"]] == [
        "OSSENSOR_DEDUP_WINDOW_MS", "OSSENSOR_DEDUP_HASH_BYTES", "OSSENSOR_DEDUP_MAX_ENTRIES"]
    assert entries["dedup"]["distribution"] == "ossensor"
