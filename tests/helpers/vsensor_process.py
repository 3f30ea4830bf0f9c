"""The reference vSensor as a process in a test namespace."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.netns import Namespace

VSENSOR = [sys.executable, "-m", "ossensor_vsensor.cli"]
#: The tests' nodes and pods use the documentation ranges (RFC 5737, RFC 3849): outside the
#: vSensor's default claims allow-list, so the test vSensors allow them (``--claims-allow``).
DOCUMENTATION_RANGES = "192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,2001:db8::/32"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def start_local(folder: Path, port: int, log_name: str, *args: str,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """``ossensor-vsensor`` on 127.0.0.1 (loopback of the test's namespace), storing under
    ``folder/data``, its output in ``folder/log_name``; returns once it listens. ``env`` is
    added to the environment, from which every ``VSENSOR_`` variable is removed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VSENSOR_")}
    environment.update(env or {})
    with open(folder / log_name, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*VSENSOR, "--listen", f"127.0.0.1:{port}", "--data-dir", str(folder / "data"),
             *args], env=environment, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while "listening on" not in (folder / log_name).read_text():
        assert process.poll() is None, (folder / log_name).read_text()
        assert time.monotonic() < deadline, "the vSensor did not start"
        time.sleep(0.05)
    return process


class VSensor:
    def __init__(self, ns: Namespace, data: Path, key: str, port: int = 8443) -> None:
        self.data = data
        self.log = data.parent / "vsensor.log"
        self.proc = ns.popen(*VSENSOR, "--listen", f"127.0.0.1:{port}", "--data-dir", str(data),
                             "--heartbeat-seconds", "1", "--rotate-seconds", "600",
                             "--claims-allow", DOCUMENTATION_RANGES,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VSENSOR_HMAC_KEY": key},
                             stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 20
        while not (match := re.search(r"fingerprint: ([0-9A-Fa-f:]+)", self.log.read_text())):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.fingerprint = match.group(1)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=15)

    def packets(self, sensor: str) -> list[bytes]:
        from scapy.utils import PcapNgReader

        found = []
        for path in sorted((self.data / sensor).glob("*.pcapng")):
            with PcapNgReader(str(path)) as reader:
                found += [bytes(p) for p in reader]
        return found

