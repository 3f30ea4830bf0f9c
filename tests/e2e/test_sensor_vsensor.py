"""The sensor ships real traffic over HTTPS to the reference vSensor, both inside a namespace."""

from __future__ import annotations

import sys
import time

from tests.helpers.netns import veth_pair
from tests.helpers.sensor import SENDER, Sensor, numbered, sensor_env
from tests.helpers.traffic import Tcpdump
from tests.helpers.vsensor_process import VSensor


def test_traffic_arrives_at_the_vsensor(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        vsensor = VSensor(rx, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        try:
            env = sensor_env(base_env, tmp_path, OSSENSOR_TRANSPORT="https",
                             VSENSOR_HOSTNAME="127.0.0.1", VSENSOR_PORT="8443",
                             VSENSOR_TLS_FINGERPRINT=vsensor.fingerprint,
                             OSSENSOR_SPOOL_DIR=str(tmp_path / "spool"), OSSENSOR_DEBUG="2")
            sensor = Sensor(rx, env, tmp_path)
            sensor.wait_for_log("capturing on rx0")
            sensor.wait_for_log("kernel filter is now", timeout=15)  # registered, filter applied
            with Tcpdump(rx, "rx0", tmp_path / "reference.pcap", "udp port 7010") as tcpdump:
                tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7010", "2000")
                time.sleep(1.5)  # tcpdump hands over its last ring block after its 1 s timeout
                assert tcpdump.stop()["dropped"] == 0
            code, _ = sensor.terminate(timeout=10)
            assert code == 0, sensor.proc.stderr.read()
        finally:
            assert vsensor.stop() == 0
        stored = vsensor.packets("test-node")
        assert numbered(stored, 7010) == set(range(2000))
        # Byte for byte what tcpdump saw on the captured interface, in the same order.
        from scapy.utils import rdpcap
        reference = [bytes(p) for p in rdpcap(str(tmp_path / "reference.pcap"))]
        ours = [frame for frame in stored if numbered([frame], 7010)]
        assert len(reference) == 2000
        assert ours == reference
        log = sensor.log.read_text() + vsensor.log.read_text()
        assert base_env["VSENSOR_HMAC_KEY"] not in log
