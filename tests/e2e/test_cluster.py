"""A simulated cluster: three nodes, each running the sensor exactly as the DaemonSet does.

Three node namespaces on a bridge with one vSensor (``tests/helpers/cluster.py``). Each sensor gets
the container of ``deploy/base/sensor-daemonset.yaml``: the image's entry point, the container's
``args``, every ``env`` entry (``valueFrom`` resolved as the kubelet does), and the capabilities
of its security context; only what genuinely differs in a test is overridden
(:func:`overrides`). With the DaemonSet's empty include list and ``NETWORK_DEVICE_ANY=1``
every interface of a node is captured, also pods that come and go while the sensor runs, so a
pod's packet crosses its veth and the uplink (or two pod veths) of one node, and two nodes'
uplinks between nodes. Node C's pods are reached over a VXLAN overlay (the inner packet on each
node's ``vx0``, the encapsulated copy on the uplinks), node A masquerades its pod's traffic to
the nodes' network. The DaemonSet loads no ``dedup``: the single-copy rules
(``ossensor_core/node/placement.py``) and the vSensor's peer rule must store every datagram sent
exactly once, also while pods come and go during traffic. The time from a pod's veth appearing
to its rule being in place is measured (under a second).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from ossensor_core.capture.peer_exclusion import AddressSet
from ossensor_core.pipeline.settings import parse_bool
from tests.helpers.cli import TEST_KEY
from tests.helpers.cluster import (
    OVERLAY,
    VSENSOR_ADDRESS,
    Node,
    VSensor,
    masquerade,
    nodes,
    pod,
    stored_keys,
    udp_sender,
    vxlan_overlay,
)
from tests.helpers.daemonset import (
    REPO,
    DaemonSetSensor,
    entrypoint,
    issue_certificate,
    overrides,
    pod_environment,
    sensor_container,
)
from tests.helpers.manifests import code_variables, helm_template, pods
from tests.helpers.netns import Namespace, needs_netns
from tests.helpers.sensor import placed

#: CAP_NET_ADMIN (12) and CAP_NET_RAW (13): ``CapEff`` of the running sensor.
NET_ADMIN_AND_RAW = (1 << 12) | (1 << 13)


def claims(node: Node) -> list[str]:
    """What a node's sensor claims at the vSensor: its addresses (its overlay address too) and
    its pod ranges."""
    return [node.address, node.address6, OVERLAY.format(node.address.rsplit(".", 1)[1]),
            node.pod_range, node.pod_range6]


# -- the container as the test reads it --------------------------------------------------------


def test_overrides():
    """Only the vSensor's address and trust, and the two emptyDir folders, differ from the
    DaemonSet; every other variable is the manifest's own."""
    container = sensor_container()
    env = pod_environment(container, "node-a")
    changed = overrides(Path("/x"), Path("/x/ca.pem"))
    assert set(changed) == {"VSENSOR_HOSTNAME", "VSENSOR_PORT", "VSENSOR_CA_FILE",
                            "OSSENSOR_CONFIG_PATH", "OSSENSOR_SPOOL_DIR"} and \
        set(changed) <= set(env)
    assert env["OSSENSOR_NAME"] == "node-a" and env["VSENSOR_HMAC_KEY"] == TEST_KEY
    assert env["NETWORK_DEVICE_ANY"] == "1" and env["NETWORK_DEVICE_INCLUDELIST"] == ""
    assert entrypoint() == ["ossensor"] and container["args"] == ["run"]


@pytest.mark.parametrize("entry", [
    {"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
    {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    {"name": "X", "valueFrom": {"secretKeyRef": {"name": "other", "key": "key"}}},
    {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
    {"name": "X", "value": "1", "unknownField": True},
])
def test_an_env_entry_the_test_does_not_understand_fails(entry):
    container = sensor_container()
    container["env"].append(entry)
    with pytest.raises(AssertionError, match="X"):
        pod_environment(container, "node-a")
    with pytest.raises(AssertionError, match="envFrom"):
        pod_environment({**sensor_container(), "envFrom": [{"secretRef": {"name": "s"}}]}, "n")


def test_the_chart_runs_the_same_sensor():
    """The chart's DaemonSet (default values) sets what the kustomization's sets and the code's
    defaults for the rest, with the same command, capabilities and probes: what the cluster
    below proves of the one holds for the other."""
    (_, template), = [v for k, v in pods(helm_template()).items() if k.startswith("DaemonSet/")]
    (chart,) = template["spec"]["containers"]
    base = sensor_container()
    chart_env = pod_environment(chart, "node-a", {("demo-hmac", "key"): TEST_KEY})
    base_env = pod_environment(base, "node-a")
    defaults = code_variables()
    for name, value in chart_env.items():
        if name == "VSENSOR_HOSTNAME":  # the release's Service; overridden in the cluster
            continue
        if name in base_env:
            assert value == base_env[name], name
            continue
        default = defaults[name]
        parsed = parse_bool(value) if isinstance(default, bool) else \
            type(default)(value) if isinstance(default, (int, float)) else value
        assert parsed == default, f"{name}: the chart sets {value!r}, the kustomization nothing"
    assert set(base_env) <= set(chart_env)
    for field in ("args", "securityContext", "readinessProbe", "livenessProbe"):
        assert chart[field] == base[field], field


# -- the cluster ---------------------------------------------------------------------------


@needs_netns
def test_three_nodes_pods_come_and_go_every_datagram_stored_once(tmp_path):
    pytest.importorskip("trustme")
    ca_file, cert_file, key_file = issue_certificate(tmp_path)
    flows: list[tuple[int, int, str]] = []  # (port, datagrams, node that stores the flow)
    latencies: list[float] = []
    # Where the sensor's code comes from (this checkout), as in bench/soak.py.
    code = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                        str(REPO)]))}
    with nodes(3) as (net, (a, b, c)):
        vxlan_overlay([a, b, c], c)
        masquerade(a, "192.0.2.0/24")
        vsensor = VSensor(net, tmp_path / "vsensor", TEST_KEY,
                          options=["--tls-cert", str(cert_file), "--tls-key", str(key_file)])
        sensors: list[DaemonSetSensor] = []
        try:
            for node in (a, b, c):
                sensors.append(DaemonSetSensor(node, tmp_path, ca_file, process_env=code))
            for sensor, node in zip(sensors, (a, b, c)):
                sensor.wait_for_log("capturing on up0", timeout=30)
                sensor.wait_for_log("capturing on pv0")
                sensor.wait_for_log("capturing on vx0")
                sensor.wait_for_log("single copy: on")
                # Registered, and the other two nodes' claims are behind the peer exclusion.
                peers = AddressSet.parse(r for n in (a, b, c) if n is not node for r in claims(n))
                sensor.wait_for_log(rf"peer exclusion \([^)]*id {peers.digest()}\)", timeout=30)
                status = Path(f"/proc/{sensor.proc.pid}/status").read_text()
                effective = int(re.search(r"^CapEff:\s*(\w+)", status, re.MULTILINE)[1], 16)
                assert effective == NET_ADMIN_AND_RAW, f"{node.name}: CapEff {effective:x}"
                sensor.wait_ready("capturing on")
            sensor_c = sensors[2]
            sensor_c.wait_capturing(3)

            def send(*batch: tuple[Namespace, str, int, int, Node]) -> None:
                senders = [udp_sender(ns, dst, port, count) for ns, dst, port, count, _ in batch]
                for sender in senders:
                    assert sender.wait(timeout=30) == 0, sender.stderr.read()
                flows.extend((port, count, owner.name) for _, _, port, count, owner in batch)

            # Pod to pod across nodes (IPv4 and IPv6), pod to another node, pod to its own
            # node, node to node. Owner: the node claiming the lower address (docs/protocol.md).
            # Pod C to pod A crosses the overlay.
            send((a.pod, b.pod_address, 7301, 300, b), (c.pod, a.pod_address, 7302, 300, a),
                 (b.pod, a.address, 7305, 300, a), (a.ns, c.address, 7306, 300, a),
                 (a.pod, c.pod_address6, 7307, 300, a), (c.pod, c.address, 7309, 300, c))
            # Masqueraded: pod A to node B's address and to the outside (the vSensor's host,
            # no node) under node A's address, beside node A's own traffic to the outside.
            send((a.pod, b.address, 7313, 300, a), (a.pod, VSENSOR_ADDRESS, 7314, 300, a),
                 (a.ns, VSENSOR_ADDRESS, 7315, 300, a))

            # A pod comes to node C while its sensor runs: captured, then gone again.
            since = time.time()
            with pod(c, 3) as first:
                sensor_c.wait_for_log(f"capturing on {first.veth} ", timeout=5)
                latencies.append(placed(sensor_c, first.veth, since))
                sensor_c.wait_capturing(4)
                sensor_c.wait_ready(first.veth)  # the readiness probe names it
                send((first.ns, c.pod_address, 7303, 300, c),  # pod to pod within the node
                     (first.ns, a.pod_address, 7304, 300, a),
                     (b.pod, first.address, 7310, 300, b))
                time.sleep(0.3)  # the datagrams are in the ring; removal drains it anyway
            sensor_c.wait_for_log(rf"interface {first.veth} \(index \d+\) went away", timeout=10)
            assert c.ns.ip("link", "show", first.veth, check=False).returncode != 0
            sensor_c.wait_capturing(3)
            assert sensor_c.proc.poll() is None, "the sensor stopped with the pod"
            sensor_c.wait_ready("capturing on", absent=first.veth)
            # And another one.
            # Pods come and go on node C while pod A sends to pod C over the overlay.
            background = udp_sender(a.pod, c.pod_address, 7330, 6000, pace=1)
            for number in (5, 6, 7):
                since = time.time()
                with pod(c, number) as passing:
                    latencies.append(placed(sensor_c, passing.veth, since))
                    send((b.pod, passing.address, 7330 + number, 100, b),
                         (passing.ns, c.pod_address, 7340 + number, 100, c))
            assert background.poll() is None, "the background flow ended before the churn"
            assert background.wait(timeout=30) == 0, background.stderr.read()
            flows.append((7330, 6000, a.name))
            # And another one.
            since = time.time()
            with pod(c, 4) as second:
                sensor_c.wait_for_log(f"capturing on {second.veth} ", timeout=5)
                latencies.append(placed(sensor_c, second.veth, since))
                sensor_c.wait_capturing(4)
                send((second.ns, b.pod_address, 7311, 300, b),
                     (a.ns, second.address, 7312, 300, a))
                time.sleep(1.0)  # the last ring blocks are handed over (block timeout)
                counters = sensor_c.metrics()
            assert re.search(rf'^ossensor_capture_packets_total{{interface="{second.veth}"}} '
                             r"[1-9]", counters, re.MULTILINE), counters
        finally:
            codes = []
            for sensor in sensors:
                codes.append((sensor.node.name, sensor.terminate(timeout=30)[0]))
            assert vsensor.stop() == 0
        assert all(code == 0 for _, code in codes), codes
        for sensor in sensors:  # single copy, no dedup, nothing it cannot place
            text = sensor.log.read_text()
            assert "single copy: on" in text and "dedup" not in text, sensor.node.name
            assert "may be stored twice" not in text, sensor.node.name
        stored = {node.name: stored_keys(vsensor, node.name) for node in (a, b, c)}
        logs = vsensor.log.read_text() + "".join(s.log.read_text() for s in sensors)
    assert TEST_KEY not in logs
    every = sum(stored.values(), Counter())
    report = []
    for port, count, owner in flows:
        seen = Counter(every[("udp", port, n)] for n in range(count))
        by = {name: sum(1 for k in keys if k[:2] == ("udp", port)) for name, keys in
              stored.items()}
        report.append(f"port {port}: {seen[0]} missing, {count - seen[0] - seen[1]} stored "
                      f"more than once; stored by {by}, owner {owner}")
    print("\n" + "\n".join(report))
    print(f"a new pod's rule in place {min(latencies) * 1000:.0f}-{max(latencies) * 1000:.0f} ms "
          f"after its veth was created ({len(latencies)} pods)")
    assert max(latencies) < 1.0, latencies
    assert all(" 0 missing, 0 stored more than once" in line for line in report), \
        "\n".join(report)
    for port, _, owner in flows:  # each flow whole in its owner's store
        assert {n for n, keys in stored.items() if any(k[:2] == ("udp", port) for k in keys)} \
            == {owner}, port
