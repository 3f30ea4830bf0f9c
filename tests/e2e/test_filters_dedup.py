"""The ``dedup`` filter: the same packet seen on several interfaces of a node is stored once.

End to end: a node namespace with a bridge (two pod ports) and a routed pod veth; the sensor
captures all three ports with ``OSSENSOR_PLUGINS=dedup``. A bridged datagram crosses both
bridge ports unchanged, a routed one crosses a bridge port and the routed veth with new MAC
addresses and a lower TTL: each must be stored once. Unit tests (ossensor_core.testing) cover
the window, the fields left out of the hash, and a micro-benchmark of the cost per packet.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
from ossensor_plugins import filter_dedup

from ossensor_core.testing import (
    FakeCaptureSource,
    build_pipeline,
    fake_interface,
    read_capture_file,
)
from tests.core.test_testing_kit import cost_per_packet, udp6_frame, udp_frame
from tests.helpers.netns import Namespace, have_netns, namespaces, run, unique
from tests.helpers.sensor import SENDER, Sensor, numbered, sensor_env

START = 1_700_000_000_000_000_000
ROUTER_MAC = b"\x02\x00\x00\x00\x00\xfe"


def dedup_run(*sources: FakeCaptureSource, **settings: str):
    environ = {f"OSSENSOR_DEDUP_{k.upper()}": v for k, v in settings.items()}
    pipeline = build_pipeline([filter_dedup], {"OSSENSOR_PLUGINS": "dedup", **environ})
    pipeline.run_sync(sources)
    return pipeline


def on(name: str, index: int, frames: list[tuple[int, int, bytes]],
       batch_packets: int = 16) -> FakeCaptureSource:
    return FakeCaptureSource(frames, fake_interface(name, index), batch_packets=batch_packets)


def stamped(frames: list[bytes], offset_ns: int = 0, step_ns: int = 1000):
    return [(START + offset_ns + n * step_ns, len(f), f) for n, f in enumerate(frames)]


def test_routed_copies_differ_only_in_mutable_fields_and_are_dropped():
    sent = [udp_frame(n, 100) for n in range(40)] + [udp6_frame(n) for n in range(10)]
    routed = [udp_frame(n, 100, ttl=63, mac=ROUTER_MAC + b"\x02" * 6) for n in range(40)] + \
        [udp6_frame(n, hop_limit=63, mac=ROUTER_MAC * 2) for n in range(10)]
    pipeline = dedup_run(on("pod0", 5, stamped(sent)), on("eth0", 2, stamped(routed, 300_000)))
    assert pipeline.transport.frames() == sent
    assert pipeline.filters[0].dropped == 50


def test_same_interface_outside_window_and_different_bytes_are_kept():
    frames = [udp_frame(n) for n in range(10)]
    pipeline = dedup_run(
        on("pod0", 5, stamped(frames) + stamped(frames[:3], 1_000_000)),  # repeats, same port
        on("eth0", 2, stamped(frames[:4], 80_000_000)),  # 80 ms later: outside 50 ms
        on("eth1", 3, stamped([udp_frame(n, 1) for n in range(5)], 10_000)),  # other bytes
        on("eth2", 4, stamped(frames[4:6], 20_000_000)),  # within the window: dropped
        window_ms="50")
    assert len(pipeline.transport.frames()) == 13 + 4 + 5
    assert pipeline.filters[0].dropped == 2


def test_memory_is_bounded():
    dedup = filter_dedup.Dedup(window_seconds=10, max_entries=1024)
    for start in range(0, 4096, 512):
        (batch,) = on("pod0", 5, stamped([udp_frame(n) for n in range(start, start + 512)]),
                      512).read()
        dedup.filter(batch)
        assert len(dedup.seen) <= 1024 + 512


def test_cost_per_packet():
    """Micro-benchmark: 64 batches of 1024 UDP packets (600 bytes), half of them duplicates,
    against the pcapng writer's per-packet loop on the same batches (run with -s to see)."""
    dedup = filter_dedup.Dedup()
    frames = [udp_frame(n, 550) for n in range(1024 * 32)]
    batches = []
    for n in range(32):
        chunk = frames[n * 1024:(n + 1) * 1024]
        batches += [*on("pod0", 5, stamped(chunk, n * 2_000_000), 1024).read(),
                    *on("eth0", 2, stamped(chunk, n * 2_000_000 + 5000), 1024).read()]
    per_packet, writer = cost_per_packet(dedup, batches)
    print(f"\ndedup: {per_packet * 1e9:.0f} ns per packet ({dedup.dropped} duplicates dropped); "
          f"pcapng writing: {writer * 1e9:.0f} ns per packet")
    assert dedup.dropped == 1024 * 32
    assert per_packet < 20e-6  # a loose bound for a loaded 2-core CI machine


@pytest.fixture
def node() -> Iterator[tuple[Namespace, Namespace, Namespace, Namespace]]:
    """(node, pod A, pod B, pod C): A and B on a bridge in the node, C behind a routed veth."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(4) as (host, pod_a, pod_b, pod_c):
        host.ip("link", "add", "br0", "type", "bridge")
        host.ip("addr", "add", "192.0.2.254/24", "dev", "br0")
        host.ip("link", "set", "br0", "up")
        host.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for pod, port, address, gateway in ((pod_a, "pa0", "192.0.2.1/24", "192.0.2.254"),
                                            (pod_b, "pb0", "192.0.2.2/24", "192.0.2.254"),
                                            (pod_c, "pc0", "198.51.100.2/24", "198.51.100.1")):
            inside = unique("vi")
            run(["ip", "link", "add", inside, "netns", pod.name, "type", "veth", "peer", "name",
                 port, "netns", host.name])
            pod.ip("link", "set", inside, "name", "eth0")
            pod.ip("addr", "add", address, "dev", "eth0")
            pod.ip("link", "set", "eth0", "up")
            pod.ip("route", "add", "default", "via", gateway)
            if port == "pc0":
                host.ip("addr", "add", "198.51.100.1/24", "dev", port)
            else:
                host.ip("link", "set", port, "master", "br0")
            host.ip("link", "set", port, "up")
        yield host, pod_a, pod_b, pod_c


def to_port(frames: list[bytes], port: int) -> list[bytes]:
    return [f for f in frames if len(f) > 38 and f[12:14] == b"\x08\x00" and f[23] == 17
            and int.from_bytes(f[36:38], "big") == port]


def test_bridged_and_routed_copies_stored_once(node, base_env, tmp_path):
    host, pod_a, _, _ = node
    env = sensor_env(base_env, tmp_path, OSSENSOR_PLUGINS="dedup", BPF="udp",
                     NETWORK_DEVICE_INCLUDELIST="^pa0$ ^pb0$ ^pc0$")
    sensor = Sensor(host, env, tmp_path)
    try:
        for port in ("pa0", "pb0", "pc0"):
            sensor.wait_for_log(f"capturing on {port}")
        pod_a.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7200", "300")  # bridged
        pod_a.exec(sys.executable, "-c", SENDER, "198.51.100.2", "7201", "300")  # routed
        time.sleep(0.5)
        code, _ = sensor.terminate()
    finally:
        sensor.kill()
    assert code == 0, sensor.proc.stderr.read()
    log = sensor.log.read_text()
    # Every port saw its copies: pa0 both streams, pb0 the bridged, pc0 the routed one.
    assert "capture pa0: 600 packets" in log, log
    assert "capture pb0: 300 packets" in log and "capture pc0: 300 packets" in log
    frames = [f for path in sorted(sensor.out.glob("*.pcapng"))
              for _, _, f in read_capture_file(path)[1]]
    for port in (7200, 7201):
        assert len(to_port(frames, port)) == 300, port
        assert numbered(frames, port) == set(range(300))
    assert "seen on another interface (600 dropped in all)" in log
