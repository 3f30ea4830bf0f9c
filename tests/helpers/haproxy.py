"""HAProxy in TCP mode on loopback, standing in for a Kubernetes Service or a cloud load
balancer in front of vSensors (``docs/cluster.md``)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.netns import Namespace

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None,
                                   reason="needs haproxy (scripts/setup.sh installs it)")


def config(listen: str, servers: Sequence[str], proxy_v2: bool = True,
           balance: str = "roundrobin") -> str:
    """A TCP balancer on ``listen`` (HOST:PORT) over ``servers`` (``HOST:PORT [options]``
    each), which tells each server the client's address in a PROXY v2 header when ``proxy_v2``
    (its health checks too: a bare connect would be a connection without a header)."""
    send = " send-proxy-v2 check-send-proxy" if proxy_v2 else ""
    backends = "\n".join(f"    server s{i} {server} check inter 1s fall 2 rise 1{send}"
                         for i, server in enumerate(servers))
    return f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend sensors
    bind {listen}
    default_backend vsensors
backend vsensors
    balance {balance}
{backends}
"""


@contextmanager
def haproxy(folder: Path, listen: str, servers: Sequence[str], proxy_v2: bool = True,
            ns: Namespace | None = None) -> Iterator[subprocess.Popen]:
    """HAProxy running (in ``ns`` when given) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "haproxy.cfg"
    path.write_text(config(listen, servers, proxy_v2))
    command = ["haproxy", "-db", "-f", str(path)]
    log = open(folder / "haproxy.log", "wb")
    with log:
        proc = (ns.popen(*command, stdout=log, stderr=log) if ns is not None
                else subprocess.Popen(command, stdout=log, stderr=log))
    try:
        time.sleep(0.5)
        assert proc.poll() is None, (folder / "haproxy.log").read_text()
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
