"""The vSensor in cluster mode on the test cluster's bridge: NATS, replicas, HAProxy, store workers.

Everything runs in the bridge namespace of :func:`tests.helpers.cluster.nodes` (``net``), where
the nodes' uplinks meet::

    node-a 192.0.2.1 --+                       +-- replica r0 192.0.2.240:8443 --+
    node-b 192.0.2.2 --+-- br0: HAProxy -------+-- replica r1 192.0.2.241:8443 --+-- NATS x3
                           192.0.2.254:8443     (PROXY v2 from 192.0.2.253)     (loopback)
                                                                 store worker(s) -+

Sensors are configured with the balancer's address (192.0.2.254, as the single-mode tests use
for the one vSensor); each replica answers their registration with its own ``--advertise``
address, and they talk to it directly until it fails. One certificate covers the three
addresses. Used by ``tests/e2e/test_vsensor_cluster.py``, ``scripts/cluster_demo.py`` and
``bench/cluster.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.cluster import VSENSOR_ADDRESS, VSENSOR_PORT, wait_for
from tests.helpers.daemonset import issue_certificate
from tests.helpers.haproxy import config as haproxy_config
from tests.helpers.nats import NatsCluster
from tests.helpers.netns import Namespace
from tests.helpers.vsensor_process import DOCUMENTATION_RANGES, VSENSOR

REPLICA_ADDRESS = "192.0.2.{}"
FIRST_REPLICA = 240
BALANCER_SOURCE = "192.0.2.253"  # HAProxy's address towards the replicas
ADMIN_TOKEN = "cluster-test-admin-token-7f3e"  # a throwaway token for namespaces of the test


@dataclass
class Process:
    """One long-running process of the cluster, started again with the same command."""

    ns: Namespace
    command: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    def start(self, ready: str | None = None, timeout: float = 60) -> None:
        with open(self.log, "a") as log:
            self.proc = self.ns.popen(*self.command, env=self.env, stdout=log,
                                      stderr=subprocess.STDOUT)
        if ready:
            offset = 0
            deadline = time.monotonic() + timeout
            while True:
                text = self.log.read_text(errors="replace")
                if ready in text[offset:] and text.count(ready) > self.starts_seen:
                    break
                assert self.proc.poll() is None, f"{self.log} exited:\n{text[-3000:]}"
                assert time.monotonic() < deadline, f"{ready!r} not in {self.log}:\n{text[-3000:]}"
                time.sleep(0.1)
            self.starts_seen = text.count(ready)

    starts_seen: int = 0

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class VSensorCluster:
    net: Namespace
    folder: Path
    key: str
    nats: NatsCluster
    ca: Path
    cert: Path
    tls_key: Path
    replicas: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)
    balancer: Process | None = None

    @property
    def addresses(self) -> list[str]:
        return [REPLICA_ADDRESS.format(FIRST_REPLICA + i) for i in range(len(self.replicas))]

    def status(self, replica: int = 0) -> dict[str, Any]:
        """``/status.json`` of a replica, fetched from inside the bridge namespace."""
        script = (
            "import json, ssl, sys, urllib.request\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
            "req = urllib.request.Request(sys.argv[1], headers={'Authorization': "
            "'Bearer ' + sys.argv[3]})\n"
            "print(urllib.request.urlopen(req, context=ctx, timeout=10).read().decode())\n")
        url = f"https://{self.addresses[replica]}:{VSENSOR_PORT}/status.json"
        done = self.net.exec(sys.executable, "-c", script, url, str(self.ca), ADMIN_TOKEN)
        return json.loads(done.stdout)

    def stored_folder(self, worker: int = 0) -> Path:
        return self.folder / f"store-{worker}"


def replica_command(cluster: VSensorCluster, index: int, extra: Sequence[str] = ()) -> list[str]:
    address = REPLICA_ADDRESS.format(FIRST_REPLICA + index)
    return [*VSENSOR, "--listen", f"{address}:{VSENSOR_PORT}",
            "--data-dir", str(cluster.folder / f"replica-{index}"),
            "--advertise", f"{address}:{VSENSOR_PORT}", "--sensor-port", str(VSENSOR_PORT),
            "--tls-cert", str(cluster.cert), "--tls-key", str(cluster.tls_key),
            "--nats", cluster.nats.urls, "--replica", f"r{index}",
            "--proxy-protocol-from", f"{BALANCER_SOURCE}/32",
            "--heartbeat-seconds", "1.0", "--claims-allow", DOCUMENTATION_RANGES, *extra]


def worker_command(cluster: VSensorCluster, index: int, extra: Sequence[str] = ()) -> list[str]:
    return [*VSENSOR, "store", "--nats", cluster.nats.urls,
            "--data-dir", str(cluster.stored_folder(index)), "--worker", f"w{index}",
            "--rotate-seconds", "600", *extra]


@contextmanager
def vsensor_cluster(net: Namespace, folder: Path, key: str, replicas: int = 2, workers: int = 1,
                    replica_options: Sequence[str] = (), worker_options: Sequence[str] = (),
                    env: dict[str, str] | None = None) -> Iterator[VSensorCluster]:
    """NATS (three servers), ``replicas`` replicas behind HAProxy and ``workers`` store workers,
    all in ``net``; stopped at the end (SIGTERM, so that files are completed)."""
    folder.mkdir(parents=True, exist_ok=True)
    hosts = [VSENSOR_ADDRESS] + [REPLICA_ADDRESS.format(FIRST_REPLICA + i)
                                 for i in range(replicas)]
    for address in hosts[1:] + [BALANCER_SOURCE]:
        net.ip("addr", "add", f"{address}/24", "dev", "br0")
    ca, cert, tls_key = issue_certificate(folder, *hosts)
    base_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VSENSOR_HMAC_KEY": key,
                "VSENSOR_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    with ExitStack() as stack:
        nats = NatsCluster(folder / "nats", 3, ns=net)
        stack.callback(nats.stop)
        for i in range(3):
            nats.start(i)
        nats.wait_ready()
        cluster = VSensorCluster(net, folder, key, nats, ca, cert, tls_key)
        for i in range(replicas):
            process = Process(net, [], folder / f"replica-{i}.log", base_env)
            cluster.replicas.append(process)
            process.command = replica_command(cluster, i, replica_options)
            process.start(ready="listening on")
            stack.callback(process.kill, signal.SIGTERM)
        for i in range(workers):
            process = Process(net, worker_command(cluster, i, worker_options),
                              folder / f"worker-{i}.log", base_env)
            cluster.workers.append(process)
            process.start()
            stack.callback(process.kill, signal.SIGTERM)
        servers = [f"{a}:{VSENSOR_PORT} source {BALANCER_SOURCE}" for a in hosts[1:]]
        (folder / "haproxy.cfg").write_text(
            haproxy_config(f"{VSENSOR_ADDRESS}:{VSENSOR_PORT}", servers, balance="source"))
        balancer = Process(net, ["haproxy", "-db", "-f", str(folder / "haproxy.cfg")],
                           folder / "haproxy.log", {"PATH": base_env["PATH"]})
        balancer.start()
        cluster.balancer = balancer
        stack.callback(balancer.kill, signal.SIGTERM)
        time.sleep(1.0)
        assert balancer.running, (folder / "haproxy.log").read_text()
        yield cluster


