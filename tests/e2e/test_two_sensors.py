"""Two sensors on two "nodes" with pods behind them: their mutual traffic is stored exactly once.

See ``tests/helpers/cluster.py`` for the layout. The sensors report their pod ranges (found from
their routes), the vSensor hands each the other's ranges, and each drops the packets whose lower
address belongs to the other: per flow, so a TCP connection ends up whole in one store.
"""

from __future__ import annotations

import json
import sys
import time

from tests.helpers.cluster import (
    VSENSOR_ADDRESS,
    VSENSOR_PORT,
    Cluster,
    VSensor,
    start_sensor,
    stopping,
    stored_keys,
    tcp_payload_bytes,
    two_nodes,
    udp_sender,
)
from tests.helpers.netns import needs_netns
from tests.helpers.traffic import Helper, run_helper

#: The other node's addresses and pod ranges, IPv4 and IPv6.
EXCLUSION = r"behind the peer exclusion \(2 IPv4 and 2 IPv6"


def _status(cluster: Cluster) -> dict:
    """``/status.json`` of the vSensor (its certificate is self-signed: not verified here)."""
    out = cluster.net.exec(sys.executable, "-c", (
        "import ssl, urllib.request; c = ssl._create_unverified_context(); "
        f"print(urllib.request.urlopen('https://{VSENSOR_ADDRESS}:{VSENSOR_PORT}/status.json', "
        "context=c).read().decode())"))
    return json.loads(out.stdout)


@needs_netns
def test_mutual_traffic_is_stored_exactly_once(base_env, tmp_path):
    with two_nodes() as cluster:
        a, b = cluster.a, cluster.b
        vsensor = VSensor(cluster.net, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        with stopping(vsensor) as sensors:
            sensors += [start_sensor(node, vsensor, base_env, tmp_path) for node in (a, b)]
            for sensor in sensors:  # each knows the other: both filters are in place
                sensor.wait_for_log(EXCLUSION, timeout=20)
            status = {s["name"]: s for s in _status(cluster)["sensors"]}
            assert status["node-a"]["workloads"] == [a.pod_range, a.pod_range6]
            assert status["node-b"]["workloads"] == [b.pod_range, b.pod_range6]

            with Helper(b.pod, "tcp-sink", "--bind", b.pod_address, "--port", "5201") as sink:
                run_helper(a.pod, "tcp-send", "--dst", b.pod_address, "--port", "5201",
                           "--bytes", str(1 << 20))
                assert sink.finish()["received"] == 1 << 20
            senders = [udp_sender(a.pod, b.pod_address, 7101, 400),
                       udp_sender(b.pod, a.pod_address, 7102, 400),
                       udp_sender(a.ns, b.address, 7103, 300),
                       udp_sender(b.ns, a.address, 7104, 300),
                       udp_sender(a.pod, b.pod_address6, 7105, 300),
                       udp_sender(b.ns, a.address6, 7106, 300)]
            for sender in senders:
                assert sender.wait(timeout=60) == 0, sender.stderr.read()
            a.pod.exec("ping", "-c", "10", "-i", "0.05", "-W", "2", b.pod_address)
            b.ns.exec("ping", "-c", "10", "-i", "0.05", "-W", "2", a.address)
            time.sleep(1.0)  # the last ring blocks are handed over
        stored = {node.name: stored_keys(vsensor, node.name) for node in (a, b)}
    both = stored["node-a"] + stored["node-b"]
    twice = {k: n for k, n in both.items() if n > 1}
    assert not twice, f"{len(twice)} packets stored more than once, e.g. {list(twice)[:5]}"
    for port, count in ((7101, 400), (7102, 400), (7103, 300), (7104, 300), (7105, 300),
                        (7106, 300)):
        assert {k[2] for k in both if k[:2] == ("udp", port)} == set(range(count)), port
    # Who stores what: the lower address's sensor, both directions of each flow.
    assert {k[1] for k in stored["node-b"] if k[0] == "udp"} == {7101, 7102, 7105}
    assert {k[1] for k in stored["node-a"] if k[0] == "udp"} == {7103, 7104, 7106}
    pings = [k for k in both if k[0] == "icmp"]
    assert len(pings) == 40  # 2 x 10 requests and their replies
    assert all(k in stored["node-b"] for k in pings if b.pod_address in k[1:3])
    assert all(k in stored["node-a"] for k in pings if a.address in k[1:3])
    # The TCP connection is whole in node B's store (data and acknowledgements), none in A's.
    assert tcp_payload_bytes(stored["node-b"], a.pod_address, b.pod_address, 5201) == 1 << 20
    transfer = [k for k in both if k[0] == "tcp" and 5201 in k[3:5]]
    assert all(k in stored["node-b"] for k in transfer)
    assert [k for k in transfer if k[1] == b.pod_address], "the other direction is there too"
    log = vsensor.log.read_text() + "".join(s.log.read_text() for s in sensors)
    assert base_env["VSENSOR_HMAC_KEY"] not in log


@needs_netns
def test_a_sensor_joining_mid_stream_loses_nothing(base_env, tmp_path):
    with two_nodes() as cluster:
        a, b = cluster.a, cluster.b
        vsensor = VSensor(cluster.net, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        with stopping(vsensor) as sensors:
            sensors.append(start_sensor(a, vsensor, base_env, tmp_path))
            sensors[0].wait_for_log("kernel filter is now", timeout=20)  # registered, alone
            # About 4 s of traffic in both kinds of flow: pod to pod (node B will own it, so
            # A must keep it until B stores it) and node to node (A owns it, B drops it at
            # once after registering).
            senders = [udp_sender(b.pod, a.pod_address, 7201, 3500, pace=1),
                       udp_sender(b.ns, a.address, 7202, 3500, pace=1)]
            time.sleep(0.5)
            sensors.append(start_sensor(b, vsensor, base_env, tmp_path))
            for sensor in sensors:
                sensor.wait_for_log(EXCLUSION, timeout=20)
            assert all(s.poll() is None for s in senders), \
                "the traffic ended before both filters were in place: nothing was tested"
            for sender in senders:
                assert sender.wait(timeout=60) == 0, sender.stderr.read()
            time.sleep(1.0)
        stored = {node.name: stored_keys(vsensor, node.name) for node in (a, b)}
    both = stored["node-a"] + stored["node-b"]
    for port in (7201, 7202):
        seen = {k[2] for k in both if k[:2] == ("udp", port)}
        assert seen == set(range(3500)), f"port {port}: {3500 - len(seen)} datagrams lost"
        twice = sum(1 for k, n in both.items() if k[:2] == ("udp", port) and n > 1)
        print(f"\nport {port}: 3500 datagrams, none lost, {twice} stored by both sensors "
              f"while the filters changed")
    # Once both filters were in place each flow went to its owner alone: the last datagrams.
    last = {("udp", 7201, 3499): "node-b", ("udp", 7202, 3499): "node-a"}
    for key, owner in last.items():
        assert both[key] == 1 and stored[owner][key] == 1


@needs_netns
def test_a_new_peer_reaches_the_others_over_the_antigena_websocket(base_env, tmp_path):
    """Heartbeats a minute apart: node A learns node B's ranges within seconds anyway, because
    the vSensor tells it over the Antigena websocket that its filter changed."""
    with two_nodes() as cluster:
        vsensor = VSensor(cluster.net, tmp_path / "vsensor", base_env["VSENSOR_HMAC_KEY"],
                          heartbeat_seconds=60)
        with stopping(vsensor, clean=False) as sensors:
            sensors.append(start_sensor(cluster.a, vsensor, base_env, tmp_path,
                                        ANTIGENA_ENABLED="true"))
            sensors[0].wait_for_log("Antigena: connected to the vSensor", timeout=30)
            started = time.monotonic()
            sensors.append(start_sensor(cluster.b, vsensor, base_env, tmp_path))
            sensors[0].wait_for_log(EXCLUSION, timeout=15)
            took = time.monotonic() - started
        assert took < 10, f"{took:.1f} s: the change waited for a heartbeat"
