"""Nothing lost, nothing stored twice, when the vSensor dies, the link to it is cut, or the sensor
restarts (the sensor on node A of ``tests/helpers/cluster.py``, the vSensor on the bridge)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.cluster import (
    Cluster,
    VSensor,
    start_sensor,
    stored_keys,
    two_nodes,
    udp_sender,
)
from tests.helpers.netns import needs_netns
from tests.helpers.sensor import Sensor


def numbered(keys: Counter, port: int) -> Counter:
    """How often each numbered datagram to ``port`` was stored."""
    return Counter({k[2]: n for k, n in keys.items() if k[0] == "udp" and k[1] == port})


def assert_each_once(keys: Counter, port: int, count: int) -> None:
    stored = numbered(keys, port)
    missing = sorted(set(range(count)) - set(stored))
    twice = sorted(seq for seq, n in stored.items() if n > 1)
    assert not missing and not twice, (f"{len(missing)} missing (first {missing[:5]}), "
                                       f"{len(twice)} stored twice (first {twice[:5]})")


def wait_for_count(sensor: Sensor, text: str, count: int, timeout: float = 30) -> None:
    """Wait until ``text`` is in the sensor's log ``count`` times (the log is appended to)."""
    deadline = time.monotonic() + timeout
    while sensor.log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not {count} times in the log"
        assert sensor.proc.poll() is None, sensor.log.read_text()[-3000:]
        time.sleep(0.1)


def stop(sensor: Sensor, vsensor: VSensor) -> None:
    code, _ = sensor.terminate(timeout=30)
    assert code == 0, sensor.log.read_text()[-3000:]
    assert vsensor.stop() == 0


def restart(vsensor: VSensor, cluster: Cluster, key: str) -> VSensor:
    """The same vSensor (data folder, certificate, port) started again."""
    again = VSensor(cluster.net, vsensor.data, key)
    assert again.fingerprint == vsensor.fingerprint
    return again


@contextmanager
def node_a_shipping(base_env: dict[str, str], tmp_path: Path,
                    interface: str = "up0") -> Iterator[tuple[Cluster, VSensor, Sensor]]:
    """The two-node cluster, its vSensor, and node A's sensor registered with it."""
    with two_nodes() as cluster:
        vsensor = VSensor(cluster.net, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        sensor = start_sensor(cluster.a, vsensor, base_env, tmp_path, interface=interface)
        sensor.wait_for_log("registered with the vSensor")
        yield cluster, vsensor, sensor


@needs_netns
def test_vsensor_killed_mid_stream_and_restarted(base_env, tmp_path):
    key = base_env["VSENSOR_HMAC_KEY"]
    with node_a_shipping(base_env, tmp_path) as (cluster, vsensor, sensor):
        a, b = cluster.a, cluster.b
        sender = udp_sender(b.ns, a.address, 7201, 6000, pace=2)  # about 3 s of traffic
        time.sleep(1.0)
        vsensor.proc.send_signal(signal.SIGKILL)  # no goodbye: files left as .part
        vsensor.proc.wait(timeout=10)
        time.sleep(1.5)
        vsensor = restart(vsensor, cluster, key)
        assert sender.wait(timeout=60) == 0, sender.stderr.read()
        # The restarted vSensor does not know the sensor (409): it registers again.
        wait_for_count(sensor, "registered with the vSensor", 2)
        time.sleep(2.0)
        stop(sensor, vsensor)
        assert_each_once(stored_keys(vsensor, "node-a"), 7201, 6000)
        assert not list((vsensor.data / "node-a").glob("*.part"))


@needs_netns
def test_link_to_the_vsensor_cut_for_30_seconds(base_env, tmp_path):
    """The sensor captures its pod's interface while its uplink (the way to the vSensor) is
    down for 30 s: chunks wait (memory, then the spool) and all arrive once, in order."""
    with node_a_shipping(base_env, tmp_path, "pv0") as (cluster, vsensor, sensor):
        a = cluster.a
        a.ns.ip("link", "set", "up0", "down")
        try:
            sender = udp_sender(a.ns, a.pod_address, 7202, 8000, pace=1)  # about 8-16 s
            assert sender.wait(timeout=60) == 0, sender.stderr.read()
            time.sleep(30)
        finally:
            a.ns.ip("link", "set", "up0", "up")
        sensor.wait_for_log("takes chunks again", timeout=60)
        time.sleep(2.0)
        stop(sensor, vsensor)
        assert_each_once(stored_keys(vsensor, "node-a"), 7202, 8000)
        assert "cannot deliver chunks" in sensor.log.read_text()


@needs_netns
def test_sensor_restarted_sends_what_it_spooled(base_env, tmp_path):
    """The vSensor is away while the sensor captures, then the sensor is stopped (SIGTERM, as
    Kubernetes does): what it could not send is spooled, and sent once by the next run."""
    key = base_env["VSENSOR_HMAC_KEY"]
    with node_a_shipping(base_env, tmp_path) as (cluster, vsensor, sensor):
        a, b = cluster.a, cluster.b
        assert vsensor.stop() == 0
        sender = udp_sender(b.ns, a.address, 7203, 3000, pace=4)
        assert sender.wait(timeout=60) == 0, sender.stderr.read()
        time.sleep(1.5)
        code, _ = sensor.terminate(timeout=30)
        assert code == 0
        assert "stay in the spool" in sensor.log.read_text()
        vsensor = restart(vsensor, cluster, key)
        again = start_sensor(a, vsensor, base_env, tmp_path)  # same spool folder and log
        wait_for_count(again, "registered with the vSensor", 2)
        time.sleep(3.0)
        stop(again, vsensor)
        assert_each_once(stored_keys(vsensor, "node-a"), 7203, 3000)
