"""The single-copy rules (``ossensor_core/node/placement.py``): roles from node views, and the
filters judged by the kernel (``tests/helpers/bpf_oracle.py``: real AF_PACKET sockets on a veth,
real frames; ``inbound`` compiles to an ``SKF_AD_PKTTYPE`` load that only the kernel runs).

The oracle's socket sees frames arriving on a veth, as the host end of a pod's veth sees what
the pod sends and an uplink sees what other hosts send: the inbound half of each rule. The
outbound half runs end to end in ``tests/e2e/test_single_copy.py``. Devices of the kinds that
cannot be created here (ipip, sit, gre, geneve, wireguard) appear in the views only: their
encapsulated copies are crafted frames.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterator

import pytest

from ossensor_core.capture.bounded import fit_bounded
from ossensor_core.capture.bpf import BPF_MAXINSNS, BpfProgram
from ossensor_core.node.placement import Link, NodeView, Rules, plan
from ossensor_core.pipeline.config import read_core_config
from ossensor_core.wire.names import LINKTYPE_ETHERNET
from tests.helpers.bpf_oracle import MARK, Kernel, kernel_oracle
from tests.helpers.traffic import ipv4_packet, udp4_packet, udp6_packet

ETH = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01"
NODE = "192.0.2.1"
POD_RANGE = "198.51.100.0/24"
SERVICES = ("10.96.0.0/12",)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    yield from kernel_oracle()


def view(*extra: Link, workloads: tuple[str, ...] = (POD_RANGE,)) -> NodeView:
    """A node: uplink ``eth0`` (default route), a Calico pod veth, and ``extra`` links."""
    return NodeView((Link(2, "eth0", "", None, (NODE, "fe80::1")),
                     Link(3, "cali1", "veth", None, ("fe80::ecee:eeff:feee:eeee",), True),
                     *extra), frozenset({2}), workloads)


def roles(node: NodeView) -> dict[str, str]:
    return {p.name: p.role for p in plan(node, Rules()).placements.values()}


def program(expression: str) -> BpfProgram:
    """As the sensor builds it: the rule bounded, before the (empty) user's filter."""
    built, note = fit_bounded("", "", LINKTYPE_ETHERNET, expression)
    assert not note
    return built


def eth(packet: bytes, ethertype: int = 0x0800, dst: bytes = ETH[:6]) -> bytes:
    return dst + ETH[6:] + struct.pack("!H", ethertype) + packet


def marked(frames: list[bytes]) -> list[bytes]:
    return [f + MARK + struct.pack("!I", i) for i, f in enumerate(frames)]


# -- roles ----------------------------------------------------------------------------------------


def test_roles_of_a_kubernetes_node():
    node = view(Link(4, "cni0", "bridge", None, ("10.244.0.1",)),
                Link(5, "veth1", "veth", 4, (), True),
                Link(6, "flannel.1", "vxlan", None, ("10.244.0.0",)),
                Link(7, "tunl0", "ipip"), Link(8, "wg0", "wireguard"),
                Link(9, "kube-ipvs0", "dummy"))
    assert roles(node) == {"eth0": "uplink", "cali1": "pod-veth", "cni0": "pod-bridge",
                           "veth1": "bridge-port", "flannel.1": "overlay", "tunl0": "overlay",
                           "wg0": "overlay", "kube-ipvs0": "uplink"}
    assert not plan(node, Rules()).notes()


def test_a_plain_host_and_a_docker_host_keep_working():
    """No Kubernetes: the uplink keeps everything (no tunnel captured), as before; a docker
    bridge is placed like a CNI bridge."""
    plain = NodeView((Link(2, "eth0", "", None, (NODE,)),), frozenset({2}))
    assert plan(plain, Rules()).expression(2) == ""
    docker = NodeView((Link(2, "eth0", "", None, (NODE,)),
                       Link(3, "docker0", "bridge", None, ("172.17.0.1",)),
                       Link(4, "vethab", "veth", 3, (), True)), frozenset({2}),
                      ("172.17.0.0/16",))
    assert roles(docker) == {"eth0": "uplink", "docker0": "pod-bridge", "vethab": "bridge-port"}


def test_what_the_rules_cannot_place_is_named_with_the_advice():
    node = NodeView((Link(2, "bond0", "bond", None, (NODE,)), Link(3, "eth0", "", 2),
                     Link(4, "eth1", "", 2), Link(5, "bond0.100", "vlan", None, ("10.0.0.1",)),
                     Link(6, "br0", "bridge"), Link(7, "eth2", "", 6),
                     Link(8, "cilium_host", "veth", None, (), False)), frozenset({2}))
    placed = plan(node, Rules())
    assert roles(node) == {"bond0": "uplink", "eth0": "unplaced", "eth1": "unplaced",
                           "bond0.100": "unplaced", "br0": "unplaced", "eth2": "unplaced",
                           "cilium_host": "unplaced"}
    notes = placed.notes()
    assert len(notes) == 6 and all("OSSENSOR_PLUGINS=dedup" in n for n in notes)
    assert all(placed.expression(p) == "" for p in (3, 4, 5, 6, 7, 8)), "unplaced keeps all"


def test_service_ranges_setting_is_checked_naming_the_variable(tmp_path):
    _, problems = read_core_config({"VSENSOR_HOSTNAME": "v", "VSENSOR_HMAC_KEY": "k",
                                    "OSSENSOR_SERVICE_RANGES": "10.96.0.0/12, cluster"})
    assert problems == ["OSSENSOR_SERVICE_RANGES: 'cluster' is not an address prefix "
                        "(e.g. 10.96.0.0/12)"]
    config, problems = read_core_config({"VSENSOR_HOSTNAME": "v", "VSENSOR_HMAC_KEY": "k",
                                         "OSSENSOR_SERVICE_RANGES": "10.96.0.0/12 fd00::/108"})
    assert not problems and config.service_ranges == ("10.96.0.0/12", "fd00::/108")
    assert config.single_copy and not config.single_copy_active  # NETWORK_DEVICE_ANY unset


# -- the kernel's verdicts ----------------------------------------------------------------------

ENCAPSULATED = [  # (what, IP packet) of every kind the uplink rule drops
    ("vxlan 4789", udp4_packet("192.0.2.9", NODE, 40001, 4789, b"\x08" + bytes(7) + b"x" * 40, 1)),
    ("vxlan 8472", udp4_packet("192.0.2.9", NODE, 40002, 8472, b"\x08" + bytes(7) + b"x" * 40, 2)),
    ("vxlan v6", udp6_packet("2001:db8::9", "2001:db8::1", 40003, 4789, b"\x08" + bytes(47))),
    ("geneve", udp4_packet("192.0.2.9", NODE, 40004, 6081, bytes(48), 3)),
    ("wireguard to", udp4_packet("192.0.2.9", NODE, 40005, 51820, b"\x04" + bytes(47), 4)),
    ("wireguard from", udp4_packet("192.0.2.9", NODE, 51820, 40006, b"\x04" + bytes(47), 5)),
    ("ipip", ipv4_packet("192.0.2.9", NODE, 4, ipv4_packet("10.1.0.2", "10.1.1.2", 17,
                                                            bytes(28), 6), 7)),
    ("sit", ipv4_packet("192.0.2.9", NODE, 41, bytes(48), 8)),
    ("gre", ipv4_packet("192.0.2.9", NODE, 47, b"\x00\x00\x08\x00" + bytes(40), 9)),
]
PLAIN = [
    ("udp", udp4_packet("192.0.2.9", NODE, 40007, 53, b"q" * 30, 10)),
    ("udp v6", udp6_packet("2001:db8::9", "2001:db8::1", 40008, 4790, b"q" * 30)),
    ("tcp", ipv4_packet("192.0.2.9", NODE, 6, bytes(20), 11)),
]
TUNNELS = (Link(10, "vxlan.calico", "vxlan"), Link(11, "gnv0", "geneve"),
           Link(12, "wg0", "wireguard"), Link(13, "tunl0", "ipip"), Link(14, "sit0", "sit"),
           Link(15, "gre0", "gre"))


@pytest.mark.parametrize("keep", [False, True])
def test_the_uplink_drops_encapsulated_copies_unless_told_to_keep_them(kernel, keep):
    rule = plan(view(*TUNNELS), Rules(keep_encapsulated=keep)).expression(2)
    frames = [eth(p, 0x86DD if "v6" in what else 0x0800) for what, p in ENCAPSULATED + PLAIN]
    got = kernel.accepted(program(rule), marked(frames))
    names = [what for what, _ in ENCAPSULATED + PLAIN]
    kept = {names[i] for i in got}
    assert kept == set(names) if keep else kept == {what for what, _ in PLAIN}


def test_the_uplink_keeps_only_the_tunnels_it_captures(kernel):
    """With only a VXLAN device, a GRE or WireGuard packet on the uplink is traffic of its own
    (no tunnel device of the node shows its inner packet): kept."""
    rule = plan(view(Link(10, "flannel.1", "vxlan")), Rules()).expression(2)
    frames = [eth(p, 0x86DD if "v6" in what else 0x0800) for what, p in ENCAPSULATED]
    kept = {ENCAPSULATED[i][0] for i in kernel.accepted(program(rule), marked(frames))}
    assert kept == {"geneve", "wireguard to", "wireguard from", "ipip", "sit", "gre"}


def test_frames_cut_short_are_kept_by_every_rule(kernel):
    """A classic BPF load past the end rejects the frame: the rules read ports, protocols and
    addresses only after a length check, so a cut frame is kept wherever it is seen."""
    vxlan = eth(ENCAPSULATED[0][1])
    to_remote = eth(udp4_packet("198.51.100.7", "203.0.113.5", 40000, 53, b"r" * 30, 12))
    cuts = [vxlan[:14 + 9], vxlan[:14 + 20], vxlan[:14 + 20 + 3], to_remote[:14 + 17],
            vxlan[:14]]
    node = view(*TUNNELS)
    # The uplink drops the whole VXLAN frame, the pod's veth the whole one to another host.
    for index, whole in ((2, vxlan), (3, to_remote)):
        rule = plan(node, Rules(SERVICES)).expression(index)
        marker = eth(udp4_packet("192.0.2.9", NODE, 1, 53, b"end", 13))
        assert kernel.frames(program(rule), cuts, marker) >= set(cuts), index
        assert kernel.accepted(program(rule), marked([whole])) == set(), index


def test_a_pod_veth_keeps_what_the_pod_sends_to_the_node_and_its_pods(kernel):
    rule = plan(view(), Rules(SERVICES)).expression(3)
    pod = "198.51.100.7"
    cases = [  # (what, frame, kept)
        ("to the node", eth(udp4_packet(pod, NODE, 40000, 53, b"a" * 20, 1)), True),
        ("to a pod of the node", eth(udp4_packet(pod, "198.51.100.9", 1, 2, b"b" * 20, 2)), True),
        ("to a Service", eth(udp4_packet(pod, "10.96.0.10", 1, 53, b"c" * 20, 3)), True),
        ("to another host", eth(udp4_packet(pod, "203.0.113.5", 1, 53, b"d" * 20, 4)), False),
        ("to another node's pod", eth(udp4_packet(pod, "198.51.101.9", 1, 2, b"e" * 20, 5)),
         False),
        ("broadcast", eth(udp4_packet(pod, "198.51.100.255", 1, 2, b"f" * 20, 6),
                          dst=b"\xff" * 6), True),
        ("ARP", eth(bytes(28), 0x0806, dst=b"\xff" * 6), True),
        ("link-local v6", eth(udp6_packet("fe80::2", "fe80::1", 1, 2, b"g" * 20), 0x86DD), True),
        ("to another host v6", eth(udp6_packet("2001:db8:2::7", "2001:db8:9::1", 1, 2,
                                               b"h" * 20), 0x86DD), False),
    ]
    got = kernel.accepted(program(rule), marked([frame for _, frame, _ in cases]))
    assert {cases[i][0] for i in got} == {what for what, _, kept in cases if kept}


def pods_view(count: int, spread: int) -> NodeView:
    """``count`` Calico pods, their /32s ``spread`` addresses apart (2: nothing merges)."""
    base = int(ipaddress.ip_address("198.51.100.0"))
    links = [Link(2, "eth0", "", None, (NODE, "2001:db8::1", "fe80::1"))]
    pods = []
    for n in range(count):
        links.append(Link(10 + n, f"cali{n:04x}", "veth", None,
                          ("fe80::ecee:eeff:feee:eeee",), True))
        pods.append(f"{ipaddress.ip_address(base + spread * n)}/32")
    return NodeView(tuple(links), frozenset({2}), tuple(pods))


@pytest.mark.parametrize("spread", [1, 2])
def test_a_hundred_pods_fit_well_under_the_kernels_limit(kernel, spread):
    started = time.perf_counter()
    rules = plan(pods_view(100, spread), Rules(SERVICES, keep_encapsulated=False))
    built = program(rules.expression(10))
    seconds = time.perf_counter() - started
    print(f"\n100 pods, /32s {spread} apart: {len(built)} BPF instructions on a pod's veth, "
          f"planned and compiled in {seconds * 1000:.0f} ms")
    assert len(built) < BPF_MAXINSNS // 4
    last = str(ipaddress.ip_address(int(ipaddress.ip_address("198.51.100.0")) + spread * 99))
    frames = [eth(udp4_packet("198.51.100.0", last, 1, 2, b"z" * 20, 1)),
              eth(udp4_packet("198.51.100.0", "203.0.113.1", 1, 2, b"z" * 20, 2))]
    assert kernel.accepted(built, marked(frames)) == {0}


def test_a_calico_block_makes_its_pods_local_before_their_routes_are_read():
    node = NodeView(view().links, frozenset({2}), (), blocks=("100.64.7.0/26",))
    assert "ip dst net 100.64.7.0/26" in plan(node, Rules()).expression(3)
    assert "100.64.7.0/26" not in plan(view(), Rules()).expression(3)
