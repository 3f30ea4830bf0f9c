"""A sensor process (``ossensor run``) in a test namespace, its environment, and numbered test traffic."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.helpers.cli import COMMAND
from tests.helpers.netns import Namespace

REPO = Path(__file__).resolve().parents[2]


SENDER = r"""
import socket, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"OSSQ" + i.to_bytes(4, "big") + bytes(i % 700), (dst, port))
    if i % 200 == 199:
        time.sleep(0.005)
"""


def sensor_env(base_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(base_env, PYTHONPATH=str(REPO), OSSENSOR_NAME="test-node",
                OSSENSOR_OUTPUT_DIR=str(tmp_path / "out"), ANTIGENA_ENABLED="false",
                OSSENSOR_LOGFILE_PATH=str(tmp_path / "sensor.log"), **extra)


class Sensor:
    def __init__(self, ns: Namespace, env: dict[str, str], tmp_path: Path,
                 pid1: bool = False) -> None:
        self.log = tmp_path / "sensor.log"
        self.out = Path(env["OSSENSOR_OUTPUT_DIR"])
        prefix = ["unshare", "--pid", "--fork", "--kill-child"] if pid1 else []
        self.proc = ns.popen(*prefix, *COMMAND, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.pid1 = pid1

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        """Wait until the log matches the regular expression ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and re.search(text, self.log.read_text()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"sensor exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the log:\n{self.log.read_text()}")

    def target_pid(self) -> int:
        """The sensor's own pid (as PID 1 of its pid namespace: the child of unshare)."""
        if not self.pid1:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            text = children.read_text().split() if children.exists() else []
            if text:
                return int(text[0])
            time.sleep(0.05)
        raise AssertionError("no sensor process under unshare")

    def terminate(self, timeout: float = 5.0) -> tuple[int, float]:
        started = time.monotonic()
        os.kill(self.target_pid(), signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout + 5)
        finally:
            self.kill()
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the sensor if it still runs (cleanup after a failed test); idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def packets(self) -> list[bytes]:
        """Every packet stored, read back with tshark-independent code (our pcapng reader)."""
        from scapy.utils import PcapNgReader

        found = []
        for path in sorted(self.out.glob("*.pcapng")):
            with PcapNgReader(str(path)) as reader:
                found += [bytes(p) for p in reader]
        return found


def numbered(packets: list[bytes], port: int) -> set[int]:
    """Sequence numbers of our test datagrams to ``port`` among captured Ethernet frames."""
    found = set()
    for frame in packets:
        if len(frame) >= 42 + 8 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            if int.from_bytes(frame[udp + 2:udp + 4], "big") == port and \
                    frame[udp + 8:udp + 12] == b"OSSQ":
                found.add(int.from_bytes(frame[udp + 12:udp + 16], "big"))
    return found



def placed(sensor: Any, veth: str, since: float, role: str = "pod-veth") -> float:
    """Seconds from ``since`` until ``veth`` had its single-copy rule (when its capture opened,
    or when the rules were computed again), from the log of ``sensor`` (a :class:`Sensor` or a
    DaemonSet's)."""
    pattern = (rf"(?m)^(\S+ \S+) \S+ ossensor\.sensor: (capturing on {veth} \([^)\n]*single "
               rf"copy: {role}|single copy: new rules on [^\n]*{veth} \({role}\))")
    sensor.wait_for_log(pattern, timeout=10)
    stamp = re.search(pattern, sensor.log.read_text())[1]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - since
