"""The whole sensor (``ossensor`` run) in a namespace: file transport, SIGTERM, hot-plug, logs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.helpers.netns import Namespace, run, unique, veth_pair
from tests.helpers.sensor import SENDER, Sensor, numbered, sensor_env


@pytest.mark.parametrize("backend", ["afpacket", "scapy"])
def test_sigterm_flushes_everything_captured(netns_pair, base_env, tmp_path, backend):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        env = sensor_env(base_env, tmp_path, OSSENSOR_CAPTURE_BACKEND=backend,
                         OSSENSOR_CHUNK_SECONDS="30", OSSENSOR_CHUNK_BYTES="33554432")
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
