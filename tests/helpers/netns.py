"""Network namespaces for tests: created with unique names, always removed.

Every test that captures or sends traffic does so only inside namespaces made here, between
addresses it assigned itself (192.0.2.0/24 TEST-NET-1, 2001:db8::/32), never on the host.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

_counter = itertools.count()


def have_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


needs_netns = pytest.mark.skipif(not have_netns(), reason="needs root and iproute2")


def run(cmd: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=60,
                          **kwargs)


class Namespace:
    """One network namespace; ``exec`` runs a command inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def exec(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return run([*self.prefix(), *cmd], check=check, **kwargs)

    def popen(self, *cmd: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix(), *cmd], **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args], check=check)


def unique(prefix: str) -> str:
    """A name unique to this process and call; short enough for an interface (15 chars)."""
    return f"{prefix}{os.getpid() % 10000}{next(_counter)}{uuid.uuid4().hex[:3]}"[:15]


@contextmanager
def namespaces(count: int = 1) -> Iterator[list[Namespace]]:
    created: list[Namespace] = []
    try:
        for _ in range(count):
            ns = Namespace(unique("ost"))
            run(["ip", "netns", "add", ns.name])
            created.append(ns)
            ns.ip("link", "set", "lo", "up")
        yield created
    finally:
        for ns in created:
            # Kill anything still running inside before removing the namespace.
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                run(["kill", "-9", pid], check=False)
            run(["ip", "netns", "del", ns.name], check=False)


@contextmanager
def veth_pair(tx_ns: Namespace, rx_ns: Namespace, tx_name: str = "tx0", rx_name: str = "rx0",
              tx_addr: str = "192.0.2.1/24", rx_addr: str = "192.0.2.2/24",
              ) -> Iterator[tuple[str, str]]:
    """A veth pair between two namespaces, addressed and up; yields the interface names."""
    tmp_tx, tmp_rx = unique("vt"), unique("vr")
    run(["ip", "link", "add", tmp_tx, "netns", tx_ns.name, "type", "veth", "peer", "name",
         tmp_rx, "netns", rx_ns.name])
    tx_ns.ip("link", "set", tmp_tx, "name", tx_name)
    rx_ns.ip("link", "set", tmp_rx, "name", rx_name)
    tx_ns.ip("addr", "add", tx_addr, "dev", tx_name)
    rx_ns.ip("addr", "add", rx_addr, "dev", rx_name)
    tx_ns.ip("link", "set", tx_name, "up")
    rx_ns.ip("link", "set", rx_name, "up")
    yield tx_name, rx_name
