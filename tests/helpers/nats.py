"""A JetStream cluster of real ``nats-server`` processes for the cluster-mode tests.

Each server gets a configuration written from :data:`SERVER_SETTINGS` (the settings that
``docs/cluster.md`` tells users to give their NATS servers; the tests run with exactly those),
its own store folder, a client port, a route port and a monitoring port. Without ``ns`` the
servers listen on the machine's loopback (ports picked free); with ``ns`` they run inside that
namespace and listen on its own loopback, on fixed ports, for replicas started in the same
namespace.

    with nats_cluster(tmp_path, size=3) as cluster:
        cluster.urls          # "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..."
        cluster.kill(1)       # SIGKILL the second server
        cluster.start(1)      # start it again on the same store folder
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import Namespace

#: What cluster mode needs of a NATS server (see docs/cluster.md): JetStream on, and the
#: server's default ``max_payload`` of 1 MiB left as it is (larger chunks are sent in parts).
SERVER_SETTINGS: dict[str, Any] = {
    "max_payload": 1 << 20,
    "jetstream_max_memory": 64 << 20,
    "jetstream_max_file": 16 << 30,
}

needs_nats = pytest.mark.skipif(shutil.which("nats-server") is None,
                                reason="needs nats-server (scripts/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NatsCluster:
    """``size`` servers forming one JetStream cluster (``size`` 1: a single server)."""

    def __init__(self, folder: Path, size: int = 3, ns: Namespace | None = None,
                 name: str = "ossensor") -> None:
        self.folder, self.size, self.ns, self.name = folder, size, ns, name
        if ns is None:
            ports = [free_port() for _ in range(3 * size)]
        else:
            ports = [4222 + i for i in range(size)] + [6222 + i for i in range(size)] \
                + [8222 + i for i in range(size)]
        self.client_ports = ports[:size]
        self.route_ports = ports[size:2 * size]
        self.monitor_ports = ports[2 * size:]
        self.procs: list[subprocess.Popen | None] = [None] * size
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def urls(self) -> str:
        """Every server, as ``--nats`` takes them."""
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def config(self, i: int) -> Path:
        store = self.folder / f"n{i}"
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in
                           enumerate(self.route_ports) if j != i)
        cluster = "" if self.size == 1 else f"""
cluster {{
  name: {self.name}
  listen: 127.0.0.1:{self.route_ports[i]}
  routes: [{routes}]
}}"""
        text = f"""server_name: n{i}
listen: 127.0.0.1:{self.client_ports[i]}
http: 127.0.0.1:{self.monitor_ports[i]}
max_payload: {SERVER_SETTINGS["max_payload"]}
jetstream {{
  store_dir: "{store}"
  max_memory_store: {SERVER_SETTINGS["jetstream_max_memory"]}
  max_file_store: {SERVER_SETTINGS["jetstream_max_file"]}
}}{cluster}
"""
        path = self.folder / f"n{i}.conf"
        path.write_text(text)
        return path

    def start(self, i: int) -> None:
        command = ["nats-server", "-c", str(self.config(i))]
        log = open(self.folder / f"n{i}.log", "ab")
        with log:
            if self.ns is None:
                self.procs[i] = subprocess.Popen(command, stdout=log, stderr=log)
            else:
                self.procs[i] = self.ns.popen(*command, stdout=log, stderr=log)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)
        self.procs[i] = None

    def monitor(self, i: int, path: str) -> dict[str, Any]:
        """A monitoring endpoint of server ``i`` (``jsz``, ``varz``...), as JSON. Works for
        servers in a namespace only when the caller runs in it too."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[i]}/{path}",
                                    timeout=5) as answer:
            return json.load(answer)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every running server answers and the JetStream meta group has a leader."""
        if self.ns is not None:
            self._wait_ports(timeout)
            return
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                ready = True
                for i, proc in enumerate(self.procs):
                    if proc is None:
                        continue
                    assert proc.poll() is None, self.log(i)
                    jsz = self.monitor(i, "jsz")
                    if self.size > 1 and not (jsz.get("meta_cluster") or {}).get("leader"):
                        ready = False
                if ready:
                    return
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"the NATS cluster did not become ready within {timeout} s "
                             f"({last}):\n" + "\n".join(self.log(i) for i in range(self.size)))

    def _wait_ports(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.ns is not None
        for port in self.client_ports:
            while self.ns.exec("bash", "-c", f"echo > /dev/tcp/127.0.0.1/{port}",
                               check=False).returncode != 0:
                assert time.monotonic() < deadline, f"NATS port {port} not open in {self.ns.name}"
                time.sleep(0.2)
        time.sleep(2.0)  # the meta leader election: a replica retries until it is there

    def log(self, i: int) -> str:
        path = self.folder / f"n{i}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        for i in range(self.size):
            self.kill(i, signal.SIGTERM)


@contextmanager
def nats_cluster(folder: Path, size: int = 3, ns: Namespace | None = None) -> Iterator[NatsCluster]:
    cluster = NatsCluster(folder, size, ns)
    try:
        for i in range(size):
            cluster.start(i)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
