"""A two-node "cluster" in network namespaces: nodes, pods behind them, a vSensor, sensors.

Layout (every address is a documentation address; all of it lives in namespaces made here)::

    pod-a 198.51.100.34/28 --pv0-- node-a 192.0.2.1 --up0--+
          2001:db8:2::2/64                2001:db8::1      |
                                                           br0 192.0.2.254 (vSensor :8443)
    pod-b 198.51.100.18/28 --pv0-- node-b 192.0.2.2 --up0--+   2001:db8::fe
          2001:db8:1::2/64                2001:db8::2

Each node routes its own pod range to ``pv0`` (a veth: a workload range by the rule of
``ossensor_core/node/workloads.py``), the other node's pod range via the other node, and everything
else via the bridge (its default route: the uplink). Pod B's range is *lower* than pod A's, so
pod-to-pod flows belong to node B's sensor and node-to-node flows to node A's (the lower-address
rule of ``docs/protocol.md``). The sensors capture ``up0`` only, where all traffic between the
nodes passes once per node.

``nodes(3)`` adds node-c (192.0.2.3, pods 198.51.100.48/28 and 2001:db8:3::/64) on the same
bridge; :func:`pod` adds a pod to a running node and removes it again.
"""

from __future__ import annotations

import ipaddress
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netns import Namespace, namespaces, run, unique, veth_pair
from tests.helpers.sensor import Sensor, sensor_env
from tests.helpers.vsensor_process import DOCUMENTATION_RANGES, VSENSOR
from tests.helpers.vsensor_process import VSensor as LoopbackVSensor

VSENSOR_ADDRESS = "192.0.2.254"
VSENSOR_PORT = 8443


@dataclass
class Node:
    name: str
    ns: Namespace
    pod: Namespace
    address: str
    pod_address: str
    pod_range: str
    address6: str
    pod_address6: str
    pod_range6: str


@dataclass
class Cluster:
    net: Namespace
    a: Node
    b: Node


def _node(net: Namespace, ns: Namespace, pod: Namespace, name: str, number: int,
          pod_range: str, pod_range6: str) -> Node:
    """Node ``number`` (1, 2): its uplink on the bridge, its pod behind a veth."""
    address, address6 = f"192.0.2.{number}", f"2001:db8::{number}"
    gateway, pod_address = _host(pod_range, 1), _host(pod_range, 2)
    gateway6, pod_address6 = _host(pod_range6, 1), _host(pod_range6, 2)
    port, uplink = unique("bp"), unique("up")
    run(["ip", "link", "add", uplink, "netns", ns.name, "type", "veth", "peer", "name", port,
         "netns", net.name])
    ns.ip("link", "set", uplink, "name", "up0")
    net.ip("link", "set", port, "master", "br0")
    net.ip("link", "set", port, "up")
    ns.ip("addr", "add", f"{address}/24", "dev", "up0")
    ns.ip("addr", "add", f"{address6}/64", "dev", "up0", "nodad")
    ns.ip("link", "set", "up0", "up")
    ns.ip("route", "add", "default", "via", VSENSOR_ADDRESS)
    ns.ip("-6", "route", "add", "default", "via", "2001:db8::fe")
    prefix = pod_range.split("/")[1]
    with veth_pair(ns, pod, "pv0", "eth0", f"{gateway}/{prefix}", f"{pod_address}/{prefix}"):
        pass
    ns.ip("addr", "add", f"{gateway6}/64", "dev", "pv0", "nodad")
    pod.ip("addr", "add", f"{pod_address6}/64", "dev", "eth0", "nodad")
    pod.ip("route", "add", "default", "via", gateway)
    pod.ip("-6", "route", "add", "default", "via", gateway6)
    ns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    return Node(name, ns, pod, address, pod_address, pod_range, address6, pod_address6,
                pod_range6)


def _host(network: str, number: int) -> str:
    return str(ipaddress.ip_network(network)[number])


#: Name and pod ranges (IPv4, IPv6) of the nodes, in the order :func:`nodes` makes them.
NODES = (("node-a", "198.51.100.32/28", "2001:db8:2::/64"),
         ("node-b", "198.51.100.16/28", "2001:db8:1::/64"),
         ("node-c", "198.51.100.48/28", "2001:db8:3::/64"))


@contextmanager
def nodes(count: int) -> Iterator[tuple[Namespace, list[Node]]]:
    """The bridge namespace and ``count`` nodes (at most three) as above, node ``n`` at
    ``192.0.2.n``, each routing every other node's pod range via that node; removed afterwards."""
    with namespaces(1 + 2 * count) as (net, *created):
        net.ip("link", "add", "br0", "type", "bridge")
        net.ip("addr", "add", f"{VSENSOR_ADDRESS}/24", "dev", "br0")
        net.ip("addr", "add", "2001:db8::fe/64", "dev", "br0", "nodad")
        net.ip("link", "set", "br0", "up")
        made = [_node(net, created[i], created[count + i], name, i + 1, pod_range, pod_range6)
                for i, (name, pod_range, pod_range6) in enumerate(NODES[:count])]
        for here in made:
            for there in made:
                if there is not here:
                    here.ns.ip("route", "add", there.pod_range, "via", there.address)
                    here.ns.ip("-6", "route", "add", there.pod_range6, "via", there.address6)
        yield net, made


@contextmanager
def two_nodes() -> Iterator[Cluster]:
    """The layout above; everything is removed afterwards."""
    with nodes(2) as (net, (a, b)):
        yield Cluster(net, a, b)


#: The VXLAN overlay's addresses: node ``n`` at ``10.200.0.n``.
OVERLAY = "10.200.0.{}"


def vxlan_overlay(made: Sequence[Node], behind: Node) -> None:
    """A VXLAN device ``vx0`` on every node (VNI 1 on Linux's port 8472, as flannel sets it,
    replicated to every other node), and ``behind``'s IPv4 pod range reached through it (and
    the others' ranges from ``behind``): pod traffic between ``behind`` and the other nodes
    crosses the overlay, encapsulated between the nodes' addresses on the uplinks."""
    for number, node in enumerate(made, 1):
        node.ns.ip("link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "8472", "local",
                   node.address, "dev", "up0")
        node.ns.ip("addr", "add", f"{OVERLAY.format(number)}/24", "dev", "vx0")
        node.ns.ip("link", "set", "vx0", "up")
        for other in made:
            if other is not node:
                node.ns.exec("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0",
                             "dst", other.address)
    there = OVERLAY.format(made.index(behind) + 1)
    for number, node in enumerate(made, 1):
        if node is not behind:
            node.ns.ip("route", "replace", behind.pod_range, "via", there, "dev", "vx0")
            behind.ns.ip("route", "replace", node.pod_range, "via", OVERLAY.format(number),
                         "dev", "vx0")


def masquerade(node: Node, destination: str) -> None:
    """The node's pods reach ``destination`` under the node's address (iptables MASQUERADE
    on the uplink, as kube-proxy and CNIs set it for traffic leaving the cluster)."""
    node.ns.exec("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", node.pod_range, "-d",
                 destination, "-o", "up0", "-j", "MASQUERADE")


@dataclass
class Pod:
    """A pod added to a running node by :func:`pod`."""

    ns: Namespace
    address: str
    veth: str  # the node's end of the pod's veth


@contextmanager
def pod(node: Node, number: int) -> Iterator[Pod]:
    """A pod at host ``number`` of ``node``'s pod range, wired as Calico wires one: a veth
    ``cali...`` with no address on the node, a ``/32`` route to the pod through it, proxy ARP
    answering for the pod's gateway 169.254.1.1. Leaving deletes the pod's namespace, which
    takes the veth with it, as the kubelet's CNI call does."""
    address = _host(node.pod_range, number)
    veth, peer = unique("cali"), unique("pe")
    with namespaces(1) as (ns,):
        run(["ip", "link", "add", veth, "netns", node.ns.name, "type", "veth", "peer", "name",
             peer, "netns", ns.name])
        ns.ip("link", "set", peer, "name", "eth0")
        ns.ip("addr", "add", f"{address}/32", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        ns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        # Answered at once, as Calico sets it: the default delays a proxy answer by up to
        # 0.8 s, while the pod's first datagrams overflow the neighbour queue and are lost.
        node.ns.exec("sysctl", "-qw", f"net.ipv4.conf.{veth}.proxy_arp=1",
                     f"net.ipv4.neigh.{veth}.proxy_delay=0")
        node.ns.ip("link", "set", veth, "up")
        node.ns.ip("route", "add", f"{address}/32", "dev", veth)
        yield Pod(ns, address, veth)


class VSensor(LoopbackVSensor):
    """The reference vSensor listening on ``host`` (the bridge) rather than loopback."""

    def __init__(self, ns: Namespace, data: Path, key: str, host: str = VSENSOR_ADDRESS,
                 port: int = VSENSOR_PORT, heartbeat_seconds: float = 1.0,
                 options: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        """``env``: added to the process's environment (an admin token, where the code
        comes from)."""
        self.data = data
        self.log = data.parent / "vsensor.log"
        with open(self.log, "w") as log:
            self.proc = ns.popen(*VSENSOR, "--listen", f"{host}:{port}", "--data-dir", str(data),
                                 "--heartbeat-seconds", str(heartbeat_seconds),
                                 "--rotate-seconds", "600",
                                 "--claims-allow", DOCUMENTATION_RANGES, *options,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                      "VSENSOR_HMAC_KEY": key, **(env or {})},
                                 stdout=subprocess.DEVNULL, stderr=log)
        self.fingerprint = wait_for(self.log, r"fingerprint: ([0-9A-Fa-f:]+)", self.proc)


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 20) -> str:
    """Wait until ``log`` matches ``pattern``; its first group (or the whole match)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text()) if log.exists() else None
        if match:
            return match.group(1) if match.groups() else match.group(0)
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {log}:\n{log.read_text()}")


def start_sensor(node: Node, vsensor: VSensor, base_env: dict[str, str], tmp_path: Path,
                 interface: str = "up0", **extra: str) -> Sensor:
    """The sensor of ``node``, shipping over HTTPS to ``vsensor``, capturing ``interface``."""
    folder = tmp_path / node.name
    folder.mkdir(exist_ok=True)
    env = sensor_env(base_env, folder, OSSENSOR_TRANSPORT="https",
                     VSENSOR_HOSTNAME=VSENSOR_ADDRESS, VSENSOR_PORT=str(VSENSOR_PORT),
                     VSENSOR_TLS_FINGERPRINT=vsensor.fingerprint,
                     OSSENSOR_SPOOL_DIR=str(folder / "spool"),
                     NETWORK_DEVICE_INCLUDELIST=f"^{interface}$",
                     OSSENSOR_CHUNK_SECONDS="0.5")
    env["OSSENSOR_NAME"] = node.name
    env.update(extra)
    sensor = Sensor(node.ns, env, folder)
    sensor.wait_for_log(f"capturing on {interface}")
    return sensor


@contextmanager
def stopping(vsensor: VSensor, clean: bool = True) -> Iterator[list[Sensor]]:
    """A list to put the started sensors in; at the end every sensor is stopped (SIGTERM) and
    then the vSensor, each asserted to exit 0 when ``clean``."""
    sensors: list[Sensor] = []
    try:
        yield sensors
    finally:
        for sensor in sensors:
            code, _ = sensor.terminate(timeout=30)
            assert code == 0 or not clean, sensor.proc.stderr.read()
        code = vsensor.stop()
        assert code == 0 or not clean, f"vSensor exited {code}"


def udp_sender(ns: Namespace, dst: str, port: int, count: int, pace: int = 20) -> subprocess.Popen:
    """Numbered datagrams (``traffic udp --seq``) sent in the background; ``pace``: sleep 1 ms
    after that many."""
    return ns.popen(sys.executable, "-m", "tests.helpers.traffic", "udp", "--dst", dst, "--ports",
                    str(port), "--count", str(count), "--sizes", "120", "--seq", "--pace",
                    str(pace), cwd=Path(__file__).resolve().parents[2],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- reading back what was stored --------------------------------------------------------------


#: UDP destination ports of VXLAN: IANA's and Linux's (flannel).
VXLAN_PORTS = (4789, 8472)


def packet_key(frame: bytes) -> tuple | None:
    """What identifies one IPv4 packet of the test traffic in a stored Ethernet frame (inside
    VXLAN too): UDP ``("udp", port, seq)`` for numbered datagrams, ICMP ``("icmp", src, dst,
    type, id, seq)``, TCP ``("tcp", src, dst, sport, dport, seq, ack, flags, payload length, window, IP id)``
    (window updates and duplicate ACKs differ only in the last two); None otherwise."""
    if len(frame) >= 62 and frame[12:14] == b"\x86\xdd" and frame[20] == 17 \
            and frame[62:66] == b"OSSQ":  # numbered UDP over IPv6 (no extension headers)
        return ("udp", struct.unpack("!H", frame[56:58])[0],
                struct.unpack("!I", frame[66:70])[0])
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
    body = ip[ihl:struct.unpack("!H", ip[2:4])[0]]
    if proto == 17 and struct.unpack("!H", body[2:4])[0] in VXLAN_PORTS and len(body) >= 30:
        return packet_key(body[16:])  # a VXLAN copy counts as a copy of its inner packet
    if proto == 17 and body[8:12] == b"OSSQ":
        return ("udp", struct.unpack("!H", body[2:4])[0], struct.unpack("!I", body[12:16])[0])
    if proto == 1 and body[0] in (0, 8):
        return ("icmp", src, dst, body[0], *struct.unpack("!HH", body[4:8]))
    if proto == 6:
        sport, dport, seq, ack = struct.unpack("!HHII", body[:12])
        offset = (body[12] >> 4) * 4
        return ("tcp", src, dst, sport, dport, seq, ack, body[13], len(body) - offset,
                struct.unpack("!H", body[14:16])[0], struct.unpack("!H", ip[4:6])[0])
    return None


def stored_keys(vsensor: VSensor, sensor: str) -> Counter:
    """How often each test packet was stored for ``sensor``."""
    return Counter(k for k in map(packet_key, vsensor.packets(sensor)) if k is not None)


def tcp_payload_bytes(keys: Counter, src: str, dst: str, dport: int) -> int:
    """Bytes of the ``src`` -> ``dst`` stream covered by the stored segments (from the SYN)."""
    segments = [k for k in keys if k[0] == "tcp" and k[1:3] == (src, dst) and k[4] == dport]
    syn = [k for k in segments if k[7] & 0x02]
    assert syn, "the SYN was not stored"
    isn = syn[0][5] + 1
    covered = 0
    for key in sorted(segments, key=lambda k: (k[5] - isn) % (1 << 32)):
        start = (key[5] - isn) % (1 << 32)
        if key[8] and start <= covered:
            covered = max(covered, start + key[8])
    return covered
