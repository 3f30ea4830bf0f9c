"""The routed trial: every packet crosses two captured interfaces of the capturing node.

The two-node cluster of ``tests/helpers/cluster.py``. Node B replays, with ``tcpreplay
--topspeed`` from memory, numbered UDP datagrams from its pod's address to node A's pod: each
leaves node B's uplink, crosses the bridge, enters node A's uplink ``up0``, is routed and leaves
on the pod's veth ``pv0``. Node A's sensor runs exactly as the DaemonSet runs it
(``tests/helpers/daemonset.py``: every interface, the plugins the manifest names, Antigena,
HTTPS to a vSensor on the bridge through a throwaway CA), so it sees every packet twice and
must store it once. The anchors capture ``up0`` alone, where every packet passes once.

The datagrams carry ``OSSQ`` and a sequence number in front of random bytes (so nothing
compresses), in the format of ``traffic udp --seq``: what was stored is counted per number
(missing, once, twice or more) in the tcpdump file, the socat receiver's file or the vSensor's
pcapng files. A socket in the pod takes the datagrams (and drops them when its small buffer is
full) so that the pod answers nothing; node A knows the pod's MAC address in advance, so that
no datagram waits for ARP.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.soak_report import count_numbered_frames
from bench.testbed import (
    REPO,
    Capturer,
    Outcome,
    Traffic,
    pcap_frames,
    pcapng_frames,
    read,
    wait_for,
)
from tests.helpers.cli import TEST_KEY
from tests.helpers.cluster import VSENSOR_ADDRESS, Cluster, Node, VSensor, two_nodes
from tests.helpers.daemonset import DaemonSetSensor, issue_certificate

ROUTED_PORT = 7402
SOURCE_PORT = 4000
#: A socket that never reads: the pod's kernel drops what overflows it, and sends no ICMP.
SINK = ("import socket, sys, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); "
        "s.bind((sys.argv[1], int(sys.argv[2]))); print('bound', flush=True); time.sleep(86400)")


def numbered_pcap(path: Path, frame: int, count: int, src_mac: str, dst_mac: str, src: str,
                  dst: str, port: int) -> None:
    """A pcap file of ``count`` IPv4/UDP frames of ``frame`` bytes to ``dst:port``, datagram
    ``n`` carrying ``OSSQ``, ``n`` (big-endian u32) and random bytes. Only the payload changes
    from frame to frame, so the IP header (checksum included) is computed once; the UDP
    checksum is 0 (none), which IPv4 allows."""
    payload = frame - 14 - 20 - 8
    if payload < 8:
        raise ValueError(f"a {frame}-byte frame has no room for a numbered datagram")
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, frame - 14, 0, 0x4000, 64, 17, 0,
                               bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", ip, 10, ~total & 0xFFFF)
    head = (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + b"\x08\x00" + bytes(ip) + struct.pack("!HHHH", SOURCE_PORT, port, frame - 34, 0)
            + b"OSSQ")
    record = struct.pack("<IIII", 0, 0, frame, frame)
    rest = payload - 8
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for start in range(0, count, 100_000):
            numbers = range(start, min(count, start + 100_000))
            noise = os.urandom(len(numbers) * rest)
            out.write(b"".join(record + head + n.to_bytes(4, "big")
                               + noise[i * rest:(i + 1) * rest] for i, n in enumerate(numbers)))


def mac_address(ns: Any, interface: str) -> str:
    return ns.exec("cat", f"/sys/class/net/{interface}/address").stdout.strip()


class RoutedBed:
    """Node A captures (``rx``, ``rx_if`` as the veth bed's, for the anchors); node B sends."""

    __test__ = False  # not a pytest class

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.net, self.a, self.b = cluster.net, cluster.a, cluster.b
        self.rx, self.rx_if = self.a.ns, "up0"
        self.workdir = workdir
        self.tx_mac, self.rx_mac = mac_address(self.b.ns, "up0"), mac_address(self.a.ns, "up0")
        self.a.ns.ip("neigh", "replace", self.a.pod_address, "lladdr",
                     mac_address(self.a.pod, "eth0"), "nud", "permanent", "dev", "pv0")
        self.sink = self.a.pod.popen(sys.executable, "-c", SINK, self.a.pod_address,
                                     str(ROUTED_PORT), stdout=subprocess.PIPE, text=True)
        assert self.sink.stdout is not None and self.sink.stdout.readline().strip() == "bound"
        tls = workdir / "vsensor-tls"
        tls.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = issue_certificate(tls)
        self.sent = 0  # numbered datagrams of the last send, for counting what was stored

    def close(self) -> None:
        self.sink.kill()
        self.sink.wait(timeout=10)

    # -- counting ---------------------------------------------------------------------------

    def _stored(self, frames: Iterator[memoryview]) -> tuple[int, dict[str, Any]]:
        """(numbers stored at least once, notes with once / twice or more / unexpected)."""
        found = count_numbered_frames(frames, ROUTED_PORT, self.sent)
        return self.sent - found["missing"], {
            "stored_once": found["stored_once"], "stored_twice": found["stored_twice_or_more"],
            "first_missing": found["first_missing"],
            "unexpected_numbers": found["unexpected_numbers"]}

    def stored_pcap(self, path: Path) -> tuple[int, dict[str, Any]]:
        return self._stored(pcap_frames(path))

    def stored_pcapng(self, paths: list[Path]) -> tuple[int, dict[str, Any]]:
        return self._stored(pcapng_frames(paths))

    # -- sending ----------------------------------------------------------------------------

    def _pcap(self, traffic: Traffic) -> Path:
        path = self.workdir / f"routed-{traffic.frame}-{traffic.packets}.pcap"
        if not path.exists():
            numbered_pcap(path, traffic.frame, traffic.packets, self.tx_mac, self.rx_mac,
                          self.b.pod_address, self.a.pod_address, ROUTED_PORT)
        return path

    def _counters(self) -> tuple[int, int, int]:
        """(packets received on node A's uplink, sent on the pod's veth, received by the pod)."""
        def value(node: Any, interface: str, name: str) -> int:
            return int(node.exec("cat", f"/sys/class/net/{interface}/statistics/{name}")
                       .stdout)
        return (value(self.a.ns, "up0", "rx_packets"), value(self.a.ns, "pv0", "tx_packets"),
                value(self.a.pod, "eth0", "rx_packets"))

    def send(self, traffic: Traffic) -> dict[str, Any]:
        """Replay the numbered datagrams from node B's uplink as fast as tcpreplay goes."""
        pcap = self._pcap(traffic)
        # The bridge forgets where node A is after 300 s of silence, and would flood.
        self.a.ns.exec("ping", "-c", "1", "-W", "1", VSENSOR_ADDRESS, check=False)
        before = self._counters()
        started = time.monotonic()
        done = subprocess.run([*self.b.ns.prefix(), "tcpreplay", "-i", "up0", "--topspeed",
                               "--preload-pcap", str(pcap)], check=True, capture_output=True,
                              text=True, timeout=300)
        seconds = time.monotonic() - started
        time.sleep(0.2)
        after = self._counters()
        sent = int(re.search(r"Successful packets:\s+(\d+)", done.stdout).group(1))
        rate = re.search(r"Rated: .*?([\d.]+) pps", done.stdout)
        self.sent = sent
        return {"on_wire": sent, "send_seconds": round(seconds, 3),
                "generator_pps": round(float(rate.group(1))) if rate else None,
                "uplink_rx_delta": after[0] - before[0],
                "pod_veth_tx_delta": after[1] - before[1],
                "pod_rx_delta": after[2] - before[2]}


@contextmanager
def routed_bed(workdir: Path) -> Iterator[RoutedBed]:
    with two_nodes() as cluster:
        bed = RoutedBed(cluster, workdir)
        try:
            yield bed
        finally:
            bed.close()


class DaemonSetCapturer(Capturer):
    """Node A's sensor started from ``deploy/base/sensor-daemonset.yaml``, shipping to a
    vSensor on the bridge that is started for the trial."""

    name = "ossensor daemonset"
    profiled = True

    def __init__(self, bed: RoutedBed, workdir: Path) -> None:
        super().__init__(bed, workdir)
        self.bed: RoutedBed = bed
        self.vsensor: VSensor | None = None
        self.sensor: DaemonSetSensor | None = None

    def helper_pids(self) -> dict[str, int]:
        return {"vsensor": self.vsensor.proc.pid} if self.vsensor is not None else {}

    def start(self) -> None:
        code = {"PYTHONPATH": ":".join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
        self.vsensor = VSensor(self.bed.net, self.workdir / "vsensor", TEST_KEY,
                               options=["--tls-cert", str(self.bed.cert),
                                        "--tls-key", str(self.bed.key)], env=code)
        self.sensor = DaemonSetSensor(self.bed.a, self.workdir, self.bed.ca, code)
        self.proc = self.sensor.proc
        log = self.sensor.log
        for ready in ("capturing on up0", "capturing on pv0", "registered with the vSensor",
                      "kernel filter is now"):
            wait_for(lambda text=ready: text in read(log), 60, self.proc, log)

    def stop(self) -> Outcome:
        assert self.sensor is not None and self.vsensor is not None
        notes: dict[str, Any] = {"exit_code": self.sensor.terminate(timeout=30)[0],
                                 "plugins": self.sensor.env.get("OSSENSOR_PLUGINS", "")}
        notes["vsensor_exit_code"] = self.vsensor.stop()
        last: dict[str, int] = {}
        for name, drops in re.findall(r"capture (\S+): \d+ packets, (\d+) kernel drops",
                                      read(self.sensor.log)):
            last[name] = int(drops)
        notes["kernel_drops_by_interface"] = last
        node: Node = self.bed.a
        stored, counted = self.bed.stored_pcapng(
            sorted((self.workdir / "vsensor" / node.name).glob("*.pcapng")))
        return Outcome(stored, sum(last.values()) if last else -1, {**notes, **counted})

    def kill(self) -> None:
        if self.sensor is not None:
            self.sensor.kill()
        if self.vsensor is not None and self.vsensor.proc.poll() is None:
            self.vsensor.proc.kill()
            self.vsensor.proc.wait(timeout=10)
