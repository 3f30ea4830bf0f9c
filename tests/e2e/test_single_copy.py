"""Single-copy capture (``ossensor_core/node/placement.py``): every packet crossing a node is
stored once, without ``dedup``, and the kernel decides.

One node namespace with every kind of interface the rules place: an uplink (a veth to a
"remote" namespace, default route, MASQUERADE for the pods' traffic), a Calico-style pod (a
``cali`` veth without address, a /32 route), two pods in a bridge (``cni0``, a /24), and a VXLAN
device to the remote (the overlay route to the bridge's pods). The sensor captures every
interface (``NETWORK_DEVICE_ANY=1``) with the file transport; each numbered datagram of each
flow must be stored exactly once, and a frame cut short inside its IPv4 header must be stored
(a classic BPF load past the end would have dropped it).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.cli import ossensor
from tests.helpers.cluster import packet_key, pod, udp_sender
from tests.helpers.netns import Namespace, needs_netns, namespaces, run, unique, veth_pair
from tests.helpers.sensor import Sensor, placed, sensor_env

NODE, REMOTE = "192.0.2.1", "192.0.2.254"
CALI_POD = "198.51.100.7"
BRIDGE, BRIDGE_PODS = "10.244.0.1", ("10.244.0.2", "10.244.0.3")
OVERLAY_NODE, OVERLAY_REMOTE = "10.200.0.1", "10.200.0.2"


@dataclass
class Node:
    node: Namespace
    remote: Namespace
    cali: Namespace
    bridged: list[Namespace]
    cali_veth: str


def _pod_veth(node: Namespace, pod: Namespace, prefix: str) -> str:
    veth, peer = unique(prefix), unique("pe")
    run(["ip", "link", "add", veth, "netns", node.name, "type", "veth", "peer", "name", peer,
         "netns", pod.name])
    pod.ip("link", "set", peer, "name", "eth0")
    pod.ip("link", "set", "eth0", "up")
    return veth


@pytest.fixture
def node() -> Iterator[Node]:
    if not have_iptables():
        pytest.skip("iptables is not installed (scripts/setup.sh installs it)")
    with namespaces(5) as (node, remote, cali, *bridged):
        up, peer = unique("up"), unique("rp")
        run(["ip", "link", "add", up, "netns", node.name, "type", "veth", "peer", "name", peer,
             "netns", remote.name])
        node.ip("link", "set", up, "name", "up0")
        remote.ip("link", "set", peer, "name", "r0")
        node.ip("addr", "add", f"{NODE}/24", "dev", "up0")
        remote.ip("addr", "add", f"{REMOTE}/24", "dev", "r0")
        for ns, name in ((node, "up0"), (remote, "r0")):
            ns.ip("link", "set", name, "up")
        node.ip("route", "add", "default", "via", REMOTE)
        # The overlay: VXLAN on the IANA port between node and remote.
        for ns, local, other, inner, dev in ((node, NODE, REMOTE, OVERLAY_NODE, "up0"),
                                             (remote, REMOTE, NODE, OVERLAY_REMOTE, "r0")):
            ns.ip("link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote",
                  other, "dstport", "4789", "dev", dev)
            ns.ip("addr", "add", f"{inner}/24", "dev", "vx0")
            ns.ip("link", "set", "vx0", "up")
        remote.ip("route", "add", "10.244.0.0/24", "via", OVERLAY_NODE)
        # A Calico-style pod.
        veth = _pod_veth(node, cali, "cali")
        cali.ip("addr", "add", f"{CALI_POD}/32", "dev", "eth0")
        cali.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        cali.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        node.exec("sysctl", "-qw", f"net.ipv4.conf.{veth}.proxy_arp=1",
                  f"net.ipv4.neigh.{veth}.proxy_delay=0", "net.ipv4.ip_forward=1")
        node.ip("link", "set", veth, "up")
        node.ip("route", "add", f"{CALI_POD}/32", "dev", veth)
        # A bridge of two pods.
        node.ip("link", "add", "cni0", "type", "bridge")
        node.ip("addr", "add", f"{BRIDGE}/24", "dev", "cni0")
        node.ip("link", "set", "cni0", "up")
        for pod, address in zip(bridged, BRIDGE_PODS):
            port = _pod_veth(node, pod, "veth")
            node.ip("link", "set", port, "master", "cni0")
            node.ip("link", "set", port, "up")
            pod.ip("addr", "add", f"{address}/24", "dev", "eth0")
            pod.ip("route", "add", "default", "via", BRIDGE)
        # The pods' traffic leaves the node under its address, as kube-proxy and CNIs set it.
        for source in (f"{CALI_POD}/32", "10.244.0.0/24"):
            node.exec("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", source, "-o", "up0",
                      "-j", "MASQUERADE")
        yield Node(node, remote, cali, bridged, veth)


def have_iptables() -> bool:
    return shutil.which("iptables") is not None


def cut_frame() -> bytes:
    """An Ethernet frame whose IPv4 header stops after 10 bytes, with a marker in the MACs."""
    return b"\x02\x00\x00\x00\x00\xaa" + b"\x02\x00\x00\x00\x00\xbb" + b"\x08\x00" + \
        b"\x45\x00\x00\x54\x12\x34\x40\x00\x40\x11"


SEND_CUT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for _ in range(3):
    s.send(bytes.fromhex(sys.argv[1]))
"""


def capture(n: Node, base_env: dict[str, str], tmp_path: Path,
            flows: list[tuple[Namespace, str, int]], **settings: str) -> tuple[Counter, list]:
    """The sensor on every interface of the node while ``flows`` send 100 numbered datagrams
    each, and a pod sends a cut frame: how often each datagram was stored, and every packet."""
    env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1", OSSENSOR_CHUNK_SECONDS="0.3",
                     OSSENSOR_SERVICE_RANGES="10.96.0.0/12", **settings)
    sensor = Sensor(n.node, env, tmp_path)
    try:
        for name in ("up0", "vx0", "cni0", n.cali_veth):
            sensor.wait_for_log(f"capturing on {name} ")
        sensor.wait_for_log("single copy: on")
        time.sleep(0.5)  # the first placement after the subscription
        senders = [udp_sender(ns, dst, port, 100) for ns, dst, port in flows]
        for sender in senders:
            assert sender.wait(timeout=30) == 0, sender.stderr.read()
        n.cali.exec(sys.executable, "-c", SEND_CUT, cut_frame().hex())
        time.sleep(1.0)
    finally:
        code, _ = sensor.terminate(timeout=20)
    assert code == 0, sensor.log.read_text()
    assert "dedup" not in sensor.log.read_text()
    packets = sensor.packets()
    return Counter(k for k in map(packet_key, packets) if k is not None), packets


def copies(stored: Counter, port: int) -> Counter:
    """How many datagrams of the flow to ``port`` were stored 0, 1, 2... times."""
    return Counter(stored[("udp", port, i)] for i in range(100))


@needs_netns
def test_every_datagram_stored_once_on_a_node_with_every_kind_of_interface(node, base_env,
                                                                          tmp_path):
    n = node
    a, b = n.bridged
    flows = [  # (from, to, port)
        (n.cali, BRIDGE_PODS[0], 7401),  # routed veth to a bridge port
        (a, BRIDGE_PODS[1], 7402),  # within the bridge
        (a, CALI_POD, 7403),  # bridge port to a routed veth
        (n.cali, NODE, 7404),  # pod to its node
        (n.node, CALI_POD, 7405),  # node to pod
        (n.node, BRIDGE_PODS[1], 7406),
        (n.cali, REMOTE, 7407),  # masqueraded on the uplink
        (b, REMOTE, 7408),
        (n.remote, BRIDGE_PODS[0], 7409),  # over the overlay to a bridged pod
        (a, OVERLAY_REMOTE, 7410),  # bridged pod over the overlay
        (n.node, REMOTE, 7411),  # node to the outside
        (n.remote, NODE, 7412),
    ]
    stored, packets = capture(n, base_env, tmp_path, flows)
    report = [f"port {port}: {dict(copies(stored, port))}" for _, _, port in flows]
    print("\n".join(report))
    assert all(line.endswith(": {1: 100}") for line in report), "\n".join(report)
    assert any(p.startswith(cut_frame()) for p in packets), "the cut frame was dropped"


@needs_netns
def test_pod_copy_adds_the_pods_view_of_its_traffic_with_other_hosts(node, base_env, tmp_path):
    """``OSSENSOR_POD_COPY``: a pod's traffic with other hosts also as the pod sees it (before
    masquerading, after the overlay), never instead of the uplink's copy; between pods of the
    node still once."""
    n = node
    a, _ = n.bridged
    flows = [(n.cali, REMOTE, 7501), (n.remote, BRIDGE_PODS[0], 7502),
             (n.cali, BRIDGE_PODS[0], 7503), (a, CALI_POD, 7504)]
    stored, packets = capture(n, base_env, tmp_path, flows, OSSENSOR_POD_COPY="true")
    assert [copies(stored, port) for _, _, port in flows] == \
        [{2: 100}, {2: 100}, {1: 100}, {1: 100}]
    # The masqueraded flow twice: from the pod's address on its veth, from the node's after.
    sources = Counter(bytes(p[26:30]) for p in packets if packet_key(p) == ("udp", 7501, 0))
    assert sources == {bytes(map(int, CALI_POD.split("."))): 1,
                       bytes(map(int, NODE.split("."))): 1}


#: A Calico-style address block of the node: a blackhole route, the pods' /32s inside it.
BLOCK = "100.64.7.0/26"


@needs_netns
@pytest.mark.parametrize("block", [True, False], ids=["in-a-block", "without-a-block"])
def test_pods_that_come_and_go_lose_nothing(node, base_env, tmp_path, block):
    """Pods come and go in the node's block while a pod sends to each new one from the moment
    its veth and route exist, and to a bridged pod all along. The new pod's veth keeps every
    copy until it is placed (stored twice meanwhile, never lost). In a block (Calico's
    blackhole route) the new pod's address is local from the start and no other rule changes:
    the steady flow is stored exactly once. Without one, each new /32 changes every pod veth's
    rule, and the two-step swap may store a datagram of the steady flow twice, never lose it."""
    n = node
    if block:
        n.node.ip("route", "add", "blackhole", BLOCK)
    env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1", OSSENSOR_CHUNK_SECONDS="0.3")
    sensor = Sensor(n.node, env, tmp_path)
    churn: list[int] = []
    try:
        sensor.wait_for_log(f"capturing on {n.cali_veth} ")
        sensor.wait_for_log("single copy: on")
        time.sleep(0.5)
        steady = udp_sender(n.cali, BRIDGE_PODS[0], 7601, 8000, pace=1)
        for number in range(10, 14):
            with pod(SimpleNamespace(ns=n.node, pod_range=BLOCK), number) as new:
                sender = udp_sender(n.cali, new.address, 7610 + number, 300, pace=1)
                assert sender.wait(timeout=30) == 0, sender.stderr.read()
                churn.append(7610 + number)
                time.sleep(0.2)
        assert steady.poll() is None, "the steady flow ended before the pods came and went"
        assert steady.wait(timeout=60) == 0, steady.stderr.read()
        time.sleep(1.0)
    finally:
        code, _ = sensor.terminate(timeout=20)
    assert code == 0, sensor.log.read_text()
    stored = Counter(k for k in map(packet_key, sensor.packets()) if k is not None)
    steady_copies = Counter(stored[("udp", 7601, i)] for i in range(8000))
    new_copies = {port: Counter(stored[("udp", port, i)] for i in range(300)) for port in churn}
    print(f"\nsteady flow: {dict(steady_copies)}; to each new pod: "
          + ", ".join(f"{dict(c)}" for c in new_copies.values()))
    assert steady_copies == {1: 8000} if block else 0 not in steady_copies, steady_copies
    assert all(0 not in copies_of for copies_of in new_copies.values()), new_copies


@needs_netns
def test_the_plan_of_that_node(node):
    """What the rules make of it, read over netlink in the node (the roles the test relies on)."""
    script = ("import json; from ossensor_core.node.placement import Rules, plan, read_node_view;"
              "print(json.dumps({p.name: p.role for p in plan(read_node_view(), Rules())"
              ".placements.values()}))")
    roles = json.loads(node.node.exec(sys.executable, "-c", script,
                                      env={"PYTHONPATH": ":".join(sys.path)}).stdout)
    assert roles["up0"] == "uplink" and roles["vx0"] == "overlay" and roles["cni0"] == \
        "pod-bridge" and roles[node.cali_veth] == "pod-veth"
    assert sorted(r for name, r in roles.items() if name.startswith("veth")) == \
        ["bridge-port", "bridge-port"]


PODS = 100


def calico_pods(node: Namespace, pods: Namespace, first: int, count: int) -> list[str]:
    """``count`` Calico-style veths on ``node`` (their pods' ends in ``pods``), each with a /32
    route two addresses from the last: no two merge, so every pod adds to the rules."""
    names = [f"cali{n:05d}" for n in range(first, first + count)]
    commands = []
    for n, name in zip(range(first, first + count), names):
        commands += [f"link add {name} type veth peer name p{n:05d} netns {pods.name}",
                     f"link set {name} up",
                     f"route add 100.{64 + n // 100}.{n % 100}.{2 * (n % 100)}/32 dev {name}"]
    run(["ip", "-n", node.name, "-batch", "-"], input="\n".join(commands) + "\n")
    return names


PROGRAM_LENGTHS = r"""
import json
from ossensor_core.capture.bounded import fit_bounded
from ossensor_core.node.placement import Rules, plan, read_node_view
placed = plan(read_node_view(), Rules(("10.96.0.0/12",)))
print(json.dumps({p.name: len(fit_bounded("", "", 1, p.expression)[0])
                  for p in placed.placements.values()}))
"""


@needs_netns
def test_a_hundred_pods_rules_in_place_fast_and_well_under_the_limit(base_env, tmp_path):
    with namespaces(2) as (node, pods):
        up, peer = unique("up"), unique("rp")
        run(["ip", "link", "add", up, "netns", node.name, "type", "veth", "peer", "name", peer,
             "netns", pods.name])
        node.ip("link", "set", up, "name", "up0")
        node.ip("addr", "add", f"{NODE}/24", "dev", "up0")
        node.ip("link", "set", "up0", "up")
        node.ip("route", "add", "default", "via", REMOTE)
        calico_pods(node, pods, 0, PODS)
        env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1",
                         OSSENSOR_SERVICE_RANGES="10.96.0.0/12",
                         OSSENSOR_AFPACKET_BLOCK_SIZE="131072", OSSENSOR_AFPACKET_BLOCK_COUNT="2")
        sensor = Sensor(node, env, tmp_path)
        try:
            sensor.wait_for_log(f"capturing on cali{PODS - 1:05d} ", timeout=60)
            sensor.wait_for_log("single copy: on")
            latencies, everyone = [], []
            for n in range(PODS, PODS + 3):  # each new /32 changes every pod veth's rule
                since = time.time()
                (veth,) = calico_pods(node, pods, n, 1)
                latencies.append(placed(sensor, veth, since))
                sensor.wait_for_log(rf"new rules on [^\n]*cali00000 \(pod-veth\)[^\n]*{veth}|"
                                    rf"new rules on [^\n]*{veth}[^\n]*cali00000 \(pod-veth\)",
                                    timeout=10)
                everyone.append(time.time() - since)  # polled: an upper bound
            lengths = json.loads(node.exec(sys.executable, "-c", PROGRAM_LENGTHS,
                                           env={"PYTHONPATH": ":".join(sys.path)}).stdout)
        finally:
            code, _ = sensor.terminate(timeout=30)
        assert code == 0, sensor.log.read_text()
    veth_lengths = sorted({v for k, v in lengths.items() if k.startswith("cali")})
    print(f"\n{PODS}-{PODS + 2} pods: a new pod's rule in place "
          f"{min(latencies) * 1000:.0f}-{max(latencies) * 1000:.0f} ms after its veth was "
          f"created, every other pod veth's new rule within {max(everyone) * 1000:.0f} ms; a "
          f"pod veth's program {veth_lengths} instructions, the uplink's "
          f"{lengths['up0']}")
    assert max(latencies) < 1.0 and max(everyone) < 1.0, (latencies, everyone)
    assert max(veth_lengths) < 4096 // 4


@needs_netns
def test_what_the_rules_cannot_place_is_named_in_check_the_log_and_the_status(base_env,
                                                                              tmp_path):
    """A macvlan device on the uplink (a bond or a VLAN device cannot be created here: the same
    rule names them): its packets are also seen on the uplink."""
    with namespaces(2) as (node, other):
        with veth_pair(node, other, "up0", "r0", f"{NODE}/24", f"{REMOTE}/24"):
            node.ip("link", "add", "mv0", "link", "up0", "type", "macvlan")
            env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1")
            result = ossensor(["check"], env, node)
            assert result.code == 0, result.output
            checked = result.json()["single_copy"]
            assert checked["active"] and [i["role"] for i in checked["interfaces"]
                                          if i["interface"] == "mv0"] == ["unplaced"]
            (note,) = checked["unplaced"]
            assert note.startswith("mv0: a macvlan device") and "OSSENSOR_PLUGINS=dedup" in note
            sensor = Sensor(node, env, tmp_path)
            try:
                sensor.wait_for_log(r"WARNING ossensor.sensor: single copy: mv0: a macvlan "
                                    r"device[^\n]*load the dedup plugin")
                status = tmp_path / "etc" / "health.json"
                deadline = time.monotonic() + 10
                while not (status.exists() and json.loads(status.read_text())["unplaced"]):
                    assert time.monotonic() < deadline, "no status naming mv0"
                    time.sleep(0.2)
                assert json.loads(status.read_text())["unplaced"] == ["mv0"]
            finally:
                code, _ = sensor.terminate(timeout=20)
            assert code == 0
    # Without every interface captured the rules are off, and check says why.
    env = sensor_env(base_env, tmp_path, NETWORK_DEVICE_ANY="1",
                     NETWORK_DEVICE_INCLUDELIST="^up0$")
    with namespaces(1) as (alone,):
        checked = ossensor(["check"], env, alone).json()["single_copy"]
    assert not checked["active"] and "need every interface captured" in checked["why"]
