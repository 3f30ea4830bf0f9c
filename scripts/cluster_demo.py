#!/usr/bin/env python3
"""``make cluster-demo``: the vSensor in cluster mode on this machine, in namespaces made here.

Two nodes with the DaemonSet's sensor each, two vSensor replicas behind HAProxy (TCP mode, PROXY
v2), three NATS servers with JetStream and one store worker, all in the test cluster's bridge
namespace (``tests/helpers/vsensor_cluster.py``). Pod B sends numbered UDP datagrams to pod A
while the replica that sensor A talks to is killed; then the demo shows what every replica knows
of the cluster (``/status.json``), and what the store worker wrote against what tcpdump saw in
pod A. Nothing is captured or sent in the machine's own network namespace; everything made is
removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak_report import count_numbered, count_numbered_frames
from bench.testbed import pcap_frames  # noqa: E402  (the repository's own helpers)
from tests.helpers.cli import TEST_KEY  # noqa: E402
from tests.helpers.cluster import nodes, udp_sender  # noqa: E402
from tests.helpers.daemonset import DaemonSetSensor  # noqa: E402
from tests.helpers.traffic import Tcpdump  # noqa: E402
from tests.helpers.vsensor_cluster import vsensor_cluster  # noqa: E402

PORT, SENT = 7501, 20_000
OUT = REPO / "cluster-demo-out"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("cluster-demo: run as root (network namespaces)", file=sys.stderr)
        return 1
    for tool in ("nats-server", "haproxy", "tshark", "tcpdump"):
        if shutil.which(tool) is None:
            print(f"cluster-demo: {tool} is missing: run make setup", file=sys.stderr)
            return 1
    code = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                        str(REPO)]))}
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    work = Path(tempfile.mkdtemp(prefix="ossensor-cluster-demo-"))
    try:
        with nodes(2) as (net, (a, b)), \
                vsensor_cluster(net, work / "vsensor", TEST_KEY, env=code) as cluster:
            say("3 NATS servers, replicas r0 (192.0.2.240) and r1 (192.0.2.241) behind HAProxy "
                "on 192.0.2.254, store worker w0")
            sensors = [DaemonSetSensor(node, work, cluster.ca, process_env=code)
                       for node in (a, b)]
            try:
                for sensor in sensors:
                    sensor.wait_for_log("peer exclusion", timeout=60)
                on = {}
                for sensor in sensors:
                    name = sensor.node.name
                    on[name] = next(i for i, r in enumerate(cluster.replicas)
                                    if f"sensor {name!r} registered" in r.log.read_text())
                    print(f"{name} registered through the balancer, talks to r{on[name]}")
                say(f"pod B sends {SENT:,} numbered datagrams to pod A; r{on['node-a']} is "
                    "killed half way")
                reference = OUT / "pod-a-tcpdump.pcap"
                with Tcpdump(a.pod, "eth0", reference, f"udp dst port {PORT}"):
                    sender = udp_sender(b.pod, a.pod_address, PORT, SENT, pace=4)
                    time.sleep(2)
                    cluster.replicas[on["node-a"]].kill()
                    print(f"r{on['node-a']} SIGKILLed")
                    sender.wait(timeout=120)
                    time.sleep(1)
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    files = sorted(cluster.stored_folder(0).glob("*/*.pcapng*"))
                    if count_numbered(files, PORT, SENT)["missing"] == 0:
                        break
                    time.sleep(2)
                survivor = 1 - on["node-a"]
                status = cluster.status(survivor)
                (OUT / "status.json").write_text(json.dumps(status, indent=2))
                say(f"/status.json of r{survivor} (whole file: {OUT / 'status.json'})")
                for row in status.get("sensors", []):
                    print(f"  sensor {row.get('name')}: replica {row.get('replica', '?')}, "
                          f"addresses {row.get('addresses')}")
                cluster_part = status.get("cluster", {})
                print(f"  cluster: {json.dumps(cluster_part)[:600]}")
            finally:
                for sensor in sensors:
                    sensor.terminate(timeout=30)
            cluster.workers[0].kill(signal.SIGTERM)  # completes its open files
            files = sorted(cluster.stored_folder(0).glob("*/*.pcapng"))
            for path in files:
                target = OUT / path.parent.name / path.name
                target.parent.mkdir(exist_ok=True)
                shutil.copy(path, target)
            seen = count_numbered_frames(pcap_frames(reference), PORT, SENT)
            stored = count_numbered(files, PORT, SENT)
            say("what the store worker wrote (pcapng, per sensor) against tcpdump in pod A")
            for path in files:
                counted = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e",
                                          "frame.number"], capture_output=True, text=True)
                print(f"  {path.parent.name}/{path.name}: {len(counted.stdout.split())} packets "
                      "(tshark)")
            print(f"  tcpdump saw {SENT - seen['missing']:,} of {SENT:,} datagrams; stored once: "
                  f"{stored['stored_once']:,}, missing: {stored['missing']:,}, stored twice: "
                  f"{stored['stored_twice_or_more']:,}")
            print(f"\nfiles under {OUT}")
            return 0 if stored["missing"] == 0 and stored["stored_twice_or_more"] == 0 else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
