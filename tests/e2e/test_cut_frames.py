"""Cut frames reach the vSensor: a sensor in a namespace, shipping over HTTPS to the reference
vSensor, stores the 33-byte frame of issue 16 (an IPv4 header cut short) and its IPv6 and
802.1ad/802.1Q kin, as tcpdump and the file transport do. Before, the vSensor's filter
(``not (host 127.0.0.1 and tcp port 8443)``, compiled with the user's into one program) read
addresses these frames do not have, and the kernel rejected them.
"""

from __future__ import annotations

import sys
import time

from tests.helpers.netns import veth_pair
from tests.helpers.sensor import SENDER, Sensor, numbered, sensor_env
from tests.helpers.vsensor_process import VSensor

FRAMES = r"""
import socket, struct, sys
interface, dst_mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
src_mac = bytes.fromhex(open(f"/sys/class/net/{interface}/address").read().strip().replace(":", ""))
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
    sock.bind((interface, 0))
    for n in range(20):
        # IPv4, 19 of its 20 header bytes: 33 bytes in all (the issue's frame); IPv6, 30 of 40;
        # QinQ (the outer tag taken off by the kernel) with the IPv4 header cut after 10 bytes.
        ip4 = struct.pack("!BBHHHBB", 0x45, 0, 60, n, 0, 64, 17) + b"\0\0" + bytes([192, 0, 2, 1, 127, 0, 0])
        ip6 = struct.pack("!IHBB", 6 << 28 | n, 20, 6, 64) + bytes([0x20, 1, 0xd, 0xb8]) + bytes(28)
        sock.send(dst_mac + src_mac + b"\x08\x00" + ip4[:19])
        sock.send(dst_mac + src_mac + b"\x86\xdd" + ip6[:30])
        sock.send(dst_mac + src_mac + b"\x88\xa8\x00\x64\x81\x00\x00\x65\x08\x00" + ip4[:10])
"""


def test_cut_frames_are_stored_over_https(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        vsensor = VSensor(rx, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        try:
            env = sensor_env(base_env, tmp_path, OSSENSOR_TRANSPORT="https",
                             VSENSOR_HOSTNAME="127.0.0.1", VSENSOR_PORT="8443",
                             VSENSOR_TLS_FINGERPRINT=vsensor.fingerprint,
                             OSSENSOR_SPOOL_DIR=str(tmp_path / "spool"))
            sensor = Sensor(rx, env, tmp_path)
            sensor.wait_for_log("capturing on rx0")
            sensor.wait_for_log("kernel filter is now", timeout=15)  # the vSensor's filter
            mac = rx.exec("cat", "/sys/class/net/rx0/address").stdout.strip()
            tx.exec(sys.executable, "-c", FRAMES, "tx0", mac)
            tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7011", "50")  # whole ones too
            time.sleep(1.5)
            code, _ = sensor.terminate(timeout=10)
            assert code == 0, sensor.proc.stderr.read()
        finally:
            assert vsensor.stop() == 0
        stored = vsensor.packets("test-node")
    assert numbered(stored, 7011) == set(range(50))
    cut4 = {f for f in stored if len(f) == 33 and f[12:14] == b"\x08\x00"}
    cut6 = {f for f in stored if len(f) == 44 and f[12:14] == b"\x86\xdd"}
    # The kernel takes the outer 802.1ad tag off; the sensor stores the frame as captured.
    qinq = {f for f in stored if f[12:14] in (b"\x81\x00", b"\x88\xa8") and len(f) <= 32}
    print(f"\nstored {len(cut4)} cut IPv4, {len(cut6)} cut IPv6 and {len(qinq)} cut QinQ frames "
          f"of 20 each")
    assert len(cut4) == len(cut6) == len(qinq) == 20
