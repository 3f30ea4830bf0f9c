"""``ossensor health`` and the Prometheus endpoint of a real sensor in a namespace (file
transport), probed from inside that namespace as a kubelet exec probe and a scraper would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.cli import TEST_KEY, ossensor
from tests.helpers.metrics import METRICS, scrape, wait_until
from tests.helpers.netns import veth_pair
from tests.helpers.sensor import SENDER, Sensor, sensor_env


def test_health_and_metrics_of_a_running_sensor(netns_pair, base_env, tmp_path: Path):
    tx, rx = netns_pair
    run_dir = tmp_path / "run"
    env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_INCLUDELIST="^rx0$",
                     OSSENSOR_RUN_DIR=str(run_dir), OSSENSOR_METRICS_ADDRESS=METRICS,
                     OSSENSOR_CHUNK_SECONDS="0.2")
    # Before the sensor runs: both probes fail, saying why.
    before = ossensor(["health"], env, rx)
    assert before.code == 1 and "not running" in before.stderr
    with veth_pair(tx, rx):
        sensor = Sensor(rx, env, tmp_path)
        try:
            sensor.wait_for_log("capturing on rx0")
            ready = wait_until(lambda: ossensor(["health"], env, rx).code == 0)
            assert ready, ossensor(["health"], env, rx).output
            result = ossensor(["health"], env, rx)
            assert result.stdout.startswith("ready: registered, capturing on rx0"), result.output
            assert ossensor(["health", "--live"], env, rx).code == 0
            status = json.loads((run_dir / "health.json").read_text())
            assert status["state"] == "running" and status["capturing"] == ["rx0"]
            assert TEST_KEY not in (run_dir / "health.json").read_text()

            tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7020", "500")

            def delivered() -> dict[str, float] | None:
                samples = scrape(rx)
                return samples if samples.get("ossensor_chunk_packets_total", 0) >= 500 else None

            samples = wait_until(delivered)
            assert samples, scrape(rx)
            assert samples['ossensor_capture_packets_total{interface="rx0"}'] >= 500
            assert samples['ossensor_capture_kernel_drops_total{interface="rx0"}'] == 0
            # The veth's own byte counters: at least the 500 datagrams' frames came in.
            received = samples['ossensor_interface_bytes_total{direction="rx",interface="rx0"}']
            assert received >= 500 * 42
            assert 'ossensor_interface_bytes_total{direction="tx",interface="rx0"}' in samples
            assert samples["ossensor_capturing_interfaces"] == 1
            assert samples["ossensor_chunks_total"] >= 1
            assert any(re.match(r'ossensor_filter_info\{.*version="[0-9a-f]{16}"', name)
                       for name in samples)
        finally:
            code, _ = sensor.terminate(timeout=10)
        assert code == 0, sensor.proc.stderr.read()
    # Stopped: readiness fails at once (state "stopping"), liveness once the process is gone.
    after = ossensor(["health"], env, rx)
    assert after.code == 1, after.output
    live = ossensor(["health", "--live"], env, rx)
    assert live.code == 1 and "gone" in live.stderr, live.output
    assert TEST_KEY not in sensor.log.read_text()


def test_stale_status_fails_liveness(base_env, tmp_path: Path):
    """A sensor whose loop stopped turning: the file is there, the process alive (this test's
    own pid stands in for it), but the status is old."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status = {"pid": os.getpid(), "state": "running", "updated": time.time() - 120,
              "registered": True, "capturing": ["eth0"]}
    (run_dir / "health.json").write_text(json.dumps(status))
    env = dict(base_env, OSSENSOR_RUN_DIR=str(run_dir))
    result = ossensor(["health", "--live"], env)
    assert result.code == 1 and "stuck" in result.stderr
    assert ossensor(["health", "--live", "--max-age", "300"], env).code == 0
    status.update(updated=time.time(), registered=False)
    (run_dir / "health.json").write_text(json.dumps(status))
    unregistered = ossensor(["health"], env)
    assert unregistered.code == 1 and "not registered" in unregistered.stderr


def test_busy_metrics_port_stops_start_up(netns, base_env, tmp_path: Path):
    """A metrics address that cannot be bound is a configuration error, named, at start-up."""
    netns.ip("link", "set", "lo", "up")
    blocker = netns.popen(sys.executable, "-c",
                          "import socket, time; s = socket.socket(); "
                          "s.bind(('127.0.0.1', 9853)); s.listen(); print('ok', flush=True); "
                          "time.sleep(30)", stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "ok"
        env = sensor_env(base_env, tmp_path, OSSENSOR_METRICS_ADDRESS=METRICS,
                         NETWORK_DEVICE_ANY="1")
        result = ossensor(["run"], env, netns, timeout=30)
        assert result.code == 1
        assert "OSSENSOR_METRICS_ADDRESS: cannot listen on 127.0.0.1:9853" in result.stderr
        bad = ossensor(["run"], dict(env, OSSENSOR_METRICS_ADDRESS="9853"), netns, timeout=30)
        assert bad.code == 1 and "OSSENSOR_METRICS_ADDRESS" in bad.stderr
    finally:
        blocker.kill()
        blocker.wait()


def test_readiness_waits_for_registration_and_metrics_show_the_vsensor(netns_pair, base_env,
                                                                       tmp_path: Path):
    """With the https transport, ready means registered; the transport's and Antigena's
    counters appear in the metrics."""
    from tests.helpers.vsensor_process import VSensor

    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, OSSENSOR_TRANSPORT="https",
                         VSENSOR_HOSTNAME="127.0.0.1", VSENSOR_PORT="8443",
                         NETWORK_DEVICE_INCLUDELIST="^rx0$",
                         OSSENSOR_SPOOL_DIR=str(tmp_path / "spool"),
                         OSSENSOR_METRICS_ADDRESS=METRICS, OSSENSOR_CHUNK_SECONDS="0.2")
        env["ANTIGENA_ENABLED"] = "true"
        env["OSSENSOR_SHUTDOWN_GRACE"] = "3"  # nothing to deliver without a vSensor
        # No vSensor yet: capturing, alive, but not ready.
        env["VSENSOR_TLS_FINGERPRINT"] = "00" * 32
        sensor = Sensor(rx, env, tmp_path)
        try:
            sensor.wait_for_log("capturing on rx0")
            assert wait_until(lambda: ossensor(["health", "--live"], env, rx).code == 0)
            waiting = ossensor(["health"], env, rx)
            assert waiting.code == 1 and "not registered" in waiting.stderr, waiting.output
            assert scrape(rx)["ossensor_transport_registered"] == 0
        finally:
            sensor.terminate(timeout=10)
        vsensor = VSensor(rx, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        env["VSENSOR_TLS_FINGERPRINT"] = vsensor.fingerprint
        sensor = Sensor(rx, env, tmp_path)
        try:
            sensor.wait_for_log("kernel filter is now", timeout=15)
            assert wait_until(lambda: ossensor(["health"], env, rx).code == 0), \
                ossensor(["health"], env, rx).output
            tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7021", "300")

            def delivered() -> dict[str, float] | None:
                samples = scrape(rx)
                sent = samples.get("ossensor_transport_packets_sent_total", 0)
                return samples if sent >= 300 else None

            samples = wait_until(delivered)
            assert samples, scrape(rx)
            assert samples["ossensor_transport_registered"] == 1
            assert samples["ossensor_transport_chunks_sent_total"] >= 1
            assert samples["ossensor_transport_bytes_sent_total"] > 0
            assert samples["ossensor_transport_chunks_dropped_total"] == 0
            assert "ossensor_transport_queued_chunks" in samples
            assert samples["ossensor_transport_chunk_retries_total"] == 0
            assert samples["ossensor_transport_spool_chunks"] == 0
            assert samples["ossensor_transport_spool_bytes"] == 0
            assert "ossensor_transport_memory_bytes" in samples
            assert samples["ossensor_antigena_connected"] == 1
            assert samples["ossensor_antigena_actions"] == 0
            assert samples["ossensor_antigena_resets_total"] == 0
        finally:
            code, _ = sensor.terminate(timeout=10)
            assert vsensor.stop() == 0
        assert code == 0, sensor.proc.stderr.read()
        assert base_env["VSENSOR_HMAC_KEY"] not in sensor.log.read_text()
