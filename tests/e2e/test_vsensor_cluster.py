"""The vSensor in cluster mode, end to end (issue 18): two DaemonSet sensors on namespaced nodes,
two replicas behind HAProxy (TCP, PROXY v2), three NATS servers with JetStream, a store worker.

While numbered datagrams flow from pod B to pod A, the replica that sensor A talks to is
SIGKILLed, a NATS server is SIGKILLed and started again, and the store worker is SIGKILLed and
started again. Every datagram that tcpdump saw in pod A must be in the worker's pcapng files
exactly once, and the files must read in tshark and tcpdump. The sensors' peer exclusions name
each other although they talk to different replicas; an Antigena action issued on one replica
resets a connection that the sensor attached to the other one sees; the action survives a
restart of every replica. (Replay protection and reports across replicas:
``tests/vsensor/test_cluster_state.py``.)
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import Counter
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.soak_report import count_numbered, count_numbered_frames
from bench.testbed import pcap_frames, pcapng_frames
from ossensor_core.capture.peer_exclusion import AddressSet
from tests.e2e.test_antigena import Stream
from tests.helpers.cli import TEST_KEY
from tests.helpers.cluster import Node, nodes, udp_sender
from tests.helpers.daemonset import DaemonSetSensor
from tests.helpers.haproxy import needs_haproxy
from tests.helpers.nats import needs_nats
from tests.helpers.netns import needs_netns
from tests.helpers.traffic import Tcpdump
from tests.helpers.vsensor_cluster import ADMIN_TOKEN, VSensorCluster, vsensor_cluster
from tests.vsensor.test_hostile_chunks import readable_by_tshark_and_tcpdump

REPO = Path(__file__).resolve().parents[2]
PORT, SENT = 7401, 30_000
VSENSOR_CLI = [sys.executable, "-m", "ossensor_vsensor.cli"]

pytestmark = [needs_netns, needs_nats, needs_haproxy]


def claims(node: Node) -> list[str]:
    return [node.address, node.address6, node.pod_range, node.pod_range6]


def replica_of(cluster: VSensorCluster, sensor: str) -> int:
    """The one replica the sensor registered with (before any failure)."""
    found = [i for i, replica in enumerate(cluster.replicas)
             if f"sensor {sensor!r} registered" in replica.log.read_text(errors="replace")]
    assert len(found) == 1, f"{sensor} registered with replicas {found}"
    return found[0]


def antigena(cluster: VSensorCluster, replica: int, *args: str) -> str:
    url = f"https://{cluster.addresses[replica]}:8443"
    done = cluster.net.exec(*VSENSOR_CLI, "antigena", "--url", url, "--ca-file",
                            str(cluster.ca), *args, check=False,
                            env={"PATH": os.environ["PATH"], "VSENSOR_ADMIN_TOKEN": ADMIN_TOKEN})
    assert done.returncode == 0, done.stderr
    return done.stdout


def vsensor_traffic(frame: memoryview) -> bool:
    """An IPv4 TCP frame to or from port 8443 (the vSensor's)."""
    if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return False
    tcp = 14 + (frame[14] & 0x0F) * 4
    return len(frame) >= tcp + 4 and 8443 in (int.from_bytes(frame[tcp:tcp + 2], "big"),
                                               int.from_bytes(frame[tcp + 2:tcp + 4], "big"))


def stored(cluster: VSensorCluster) -> list[Path]:
    return sorted(cluster.stored_folder(0).glob("*/*.pcapng"))


def test_every_datagram_once_through_killed_replica_nats_server_and_store_worker(tmp_path):
    pytest.importorskip("trustme")
    code = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                        str(REPO)]))}
    with nodes(2) as (net, (a, b)), \
            vsensor_cluster(net, tmp_path / "vsensor", TEST_KEY, env=code) as cluster:
        sensors = [DaemonSetSensor(node, tmp_path, cluster.ca, process_env=code)
                   for node in (a, b)]
        try:
            for sensor, node, other in zip(sensors, (a, b), (b, a)):
                sensor.wait_for_log("capturing on up0", timeout=30)
                # Registered, and the other node's claims are behind the peer exclusion,
                # whichever replica each of them talks to.
                peers = AddressSet.parse(claims(other))
                sensor.wait_for_log(rf"peer exclusion \([^)]*id {peers.digest()}\)", timeout=30)
            on = {s.node.name: replica_of(cluster, s.node.name) for s in sensors}
            assert on["node-a"] != on["node-b"], f"both sensors on one replica: {on}"

            # -- numbered traffic through the failures ---------------------------------------
            reference = tmp_path / "pod-a.pcap"
            with Tcpdump(a.pod, "eth0", reference, f"udp dst port {PORT}"):
                sender = udp_sender(b.pod, a.pod_address, PORT, SENT, pace=2)
                time.sleep(3)
                cluster.replicas[on["node-a"]].kill()  # sensor A falls back to the balancer
                time.sleep(3)
                cluster.nats.kill(1)
                time.sleep(4)
                cluster.nats.start(1)
                time.sleep(2)
                cluster.workers[0].kill()
                time.sleep(3)
                cluster.workers[0].start()
                assert sender.wait(timeout=120) == 0, sender.stderr.read()
                time.sleep(1)
            # tcpdump in pod A: the datagrams arrived (it may stop before the last few).
            seen = count_numbered_frames(pcap_frames(reference), PORT, SENT)
            assert seen["stored_once"] >= SENT - 100 and not seen["stored_twice_or_more"], seen
            # Everything the sensors hold reaches the files: stop the worker cleanly once the
            # spools are empty and the stream has been read, so that its files are complete.
            deadline = time.monotonic() + 120
            while True:
                spools = [p for s in sensors for p in (tmp_path / s.node.name / "spool")
                          .glob("*.chunk")]
                result = count_numbered(stored(cluster) + sorted(
                    cluster.stored_folder(0).glob("*/*.part")), PORT, SENT)
                if not spools and result["missing"] == 0:
                    break
                assert time.monotonic() < deadline, (result, spools)
                time.sleep(2)
            cluster.workers[0].kill(signal.SIGTERM)
            result = count_numbered(stored(cluster), PORT, SENT)
            assert result["stored_once"] == SENT and result["stored_twice_or_more"] == 0, result
            files = stored(cluster)
            assert sum(readable_by_tshark_and_tcpdump(f) for f in files) >= SENT
            # The sensors' own traffic to the vSensor (to the balancer and to each replica
            # directly, port 8443) is never among what they captured.
            own = [f for f in pcapng_frames(files) if vsensor_traffic(f)]
            assert not own, f"{len(own)} frames of the sensors' own traffic stored: " + str(
                Counter((ipaddress.ip_address(bytes(f[26:30])), ipaddress.ip_address(bytes(f[30:34])))
                        for f in own).most_common(8))
            # Each replica saw the sensors' own addresses (from the PROXY header through the
            # balancer, from the connection directly), never the balancer's.
            logs = "".join(r.log.read_text(errors="replace") for r in cluster.replicas)
            assert f"registered from {a.address} " in logs and f"registered from {b.address} " \
                in logs, logs[-2000:]
            assert "registered from 192.0.2.253" not in logs
            cluster.workers[0].start()

            # -- Antigena across replicas ----------------------------------------------------
            cluster.replicas[on["node-a"]].start(ready="listening on")
            server = Stream(a.pod, "server", a.pod_address, "7100")
            client = None
            try:
                server.wait("ready")
                client = Stream(b.pod, "client", a.pod_address, "7100", "20")
                client.wait("connected")
                time.sleep(1.0)
                # Issued on the replica that sensor B talks to, for sensor A.
                issued = time.time()
                action_id = antigena(cluster, on["node-b"], "block", "--sensor", "node-a",
                                     "--dst", a.pod_address, "--dport", "7100",
                                     "--duration", "120").strip()
                error = client.result(timeout=10)
                assert error.get("errno") == "ECONNRESET", error
                assert error["t"] - issued < 2.0, error["t"] - issued
            finally:
                for stream in (client, server):
                    if stream is not None:
                        stream.stop()
            # Every replica restarted: the action is still in force.
            for replica in cluster.replicas:
                replica.kill(signal.SIGTERM)
            for replica in cluster.replicas:
                replica.start(ready="listening on")
            listed = json.loads(antigena(cluster, on["node-a"], "list", "--json"))
            assert action_id in [action["id"] for action in listed], listed
        finally:
            for sensor in sensors:
                sensor.terminate(timeout=30)
