"""The whole sensor (``ossensor`` run) in a namespace: file transport, SIGTERM, hot-plug, logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import COMMAND
from tests.helpers.netns import Namespace, run, unique, veth_pair

REPO = Path(__file__).resolve().parents[2]

SENDER = r"""
import socket, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"OSSQ" + i.to_bytes(4, "big") + bytes(i % 700), (dst, port))
    if i % 200 == 199:
        time.sleep(0.005)
"""


def sensor_env(base_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(base_env, PYTHONPATH=str(REPO), OSSENSOR_NAME="test-node",
                OSSENSOR_OUTPUT_DIR=str(tmp_path / "out"), ANTIGENA_ENABLED="false",
                OSSENSOR_LOGFILE_PATH=str(tmp_path / "sensor.log"), **extra)


class Sensor:
    def __init__(self, ns: Namespace, env: dict[str, str], tmp_path: Path,
                 pid1: bool = False) -> None:
        self.log = tmp_path / "sensor.log"
        self.out = Path(env["OSSENSOR_OUTPUT_DIR"])
        prefix = ["unshare", "--pid", "--fork", "--kill-child"] if pid1 else []
        self.proc = ns.popen(*prefix, *COMMAND, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.pid1 = pid1

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        """Wait until the log matches the regular expression ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and re.search(text, self.log.read_text()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"sensor exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log:\n{self.log.read_text()}")

    def target_pid(self) -> int:
        """The sensor's own pid (as PID 1 of its pid namespace: the child of unshare)."""
        if not self.pid1:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            text = children.read_text().split() if children.exists() else []
            if text:
                return int(text[0])
            time.sleep(0.05)
        raise AssertionError("no sensor process under unshare")

    def terminate(self, timeout: float = 5.0) -> tuple[int, float]:
        started = time.monotonic()
        os.kill(self.target_pid(), signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout + 5)
        finally:
            self.kill()
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the sensor if it still runs (cleanup after a failed test); idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def packets(self) -> list[bytes]:
        """Every packet stored, read back with tshark-independent code (our pcapng reader)."""
        from scapy.utils import PcapNgReader

        found = []
        for path in sorted(self.out.glob("*.pcapng")):
            with PcapNgReader(str(path)) as reader:
                found += [bytes(p) for p in reader]
        return found


def numbered(packets: list[bytes], port: int) -> set[int]:
    """Sequence numbers of our test datagrams to ``port`` among captured Ethernet frames."""
    found = set()
    for frame in packets:
        if len(frame) >= 42 + 8 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            if int.from_bytes(frame[udp + 2:udp + 4], "big") == port and \
                    frame[udp + 8:udp + 12] == b"OSSQ":
                found.add(int.from_bytes(frame[udp + 12:udp + 16], "big"))
    return found


@pytest.mark.parametrize("backend", ["afpacket", "scapy"])
def test_sigterm_flushes_everything_captured(netns_pair, base_env, tmp_path, backend):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, OSSENSOR_CAPTURE_BACKEND=backend,
                         OSSENSOR_CHUNK_SECONDS="30", OSSENSOR_CHUNK_BYTES="67108864")
        sensor = Sensor(rx, env, tmp_path)
        sensor.wait_for_log("capturing on rx0")
        tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7000", "3000")
        time.sleep(0.3)  # the datagrams are on the wire; the chunk is not cut yet (30 s)
        code, took = sensor.terminate()
        assert code == 0, sensor.proc.stderr.read()
        assert took < 5.0
        assert not list(sensor.out.glob("*.part")), "a file was left unfinished"
        assert numbered(sensor.packets(), 7000) == set(range(3000))


def test_sigterm_as_pid1(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        sensor = Sensor(rx, sensor_env(base_env, tmp_path), tmp_path, pid1=True)
        sensor.wait_for_log("capturing on rx0")
        nspid = [line for line in Path(f"/proc/{sensor.target_pid()}/status").read_text()
                 .splitlines() if line.startswith("NSpid")][0].split()
        assert nspid[-1] == "1", nspid
        tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7001", "200")
        time.sleep(0.3)
        code, took = sensor.terminate()
        assert code == 0 and took < 5.0
        assert numbered(sensor.packets(), 7001) == set(range(200))


def packet_socket_ifindexes(ns: Namespace) -> set[int]:
    """Interfaces that have a packet socket bound, from /proc/net/packet in ``ns``."""
    lines = ns.exec("cat", "/proc/net/packet").stdout.splitlines()[1:]
    return {int(line.split()[4]) for line in lines if line.split()}


def ifindex(ns: Namespace, name: str) -> int:
    return int(ns.exec("cat", f"/sys/class/net/{name}/ifindex").stdout)


def test_hotplug_opens_captures_by_the_same_rules(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1",
                         NETWORK_DEVICE_INCLUDELIST="^rx ^cali", NETWORK_DEVICE_EXCLUDELIST="^calix",
                         OSSENSOR_DEBUG="1")
        sensor = Sensor(rx, env, tmp_path)
        sensor.wait_for_log("capturing on rx0")
        time.sleep(0.5)
        links = []
        for name, peer, net in (("cali7", unique("pc"), "198.18.7"),
                                ("calix1", unique("px"), "198.18.8")):
            run(["ip", "link", "add", name, "netns", rx.name, "type", "veth", "peer", "name",
                 peer, "netns", tx.name])
            rx.ip("addr", "add", f"{net}.2/24", "dev", name)
            tx.ip("addr", "add", f"{net}.1/24", "dev", peer)
            rx.ip("link", "set", name, "up")
            tx.ip("link", "set", peer, "up")
            links.append(name)
        added = time.monotonic()
        sensor.wait_for_log("capturing on cali7", timeout=5)
        assert time.monotonic() - added < 1.5
        tx.exec(sys.executable, "-c", SENDER, "198.18.7.2", "7002", "100")
        tx.exec(sys.executable, "-c", SENDER, "198.18.8.2", "7003", "100")
        time.sleep(0.5)
        sockets = packet_socket_ifindexes(rx)
        assert ifindex(rx, "cali7") in sockets
        assert ifindex(rx, "calix1") not in sockets
        code, _ = sensor.terminate()
        assert code == 0
        packets = sensor.packets()
        assert numbered(packets, 7002) == set(range(100))
        assert numbered(packets, 7003) == set()
        assert "calix1" not in sensor.log.read_text()


def test_debug_levels(netns_pair, base_env, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, OSSENSOR_DEBUG="5", OSSENSOR_STATS_SECONDS="0.5",
                         BPF="udp port 7004")
        sensor = Sensor(rx, env, tmp_path)
        sensor.wait_for_log("capturing on rx0")
        tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7004", "3")
        sensor.wait_for_log("capture rx0: 3 packets, 0 kernel drops", timeout=5)
        sensor.wait_for_log(r"chunk \d+: 3 packets, \d+ record bytes", timeout=5)
        code, _ = sensor.terminate()
        assert code == 0
        log = sensor.log.read_text()
        assert (b"OSSQ" + (2).to_bytes(4, "big")).hex() in log  # level 5: packets as hex
        assert base_env["VSENSOR_HMAC_KEY"] not in log

        quiet = tmp_path / "quiet"
        quiet.mkdir()
        env = sensor_env(base_env, quiet, OSSENSOR_DEBUG="0", OSSENSOR_STATS_SECONDS="0.5")
        sensor = Sensor(rx, env, quiet)
        sensor.wait_for_log("capturing on rx0")
        time.sleep(1.2)
        sensor.terminate()
        assert "kernel drops" not in sensor.log.read_text()
