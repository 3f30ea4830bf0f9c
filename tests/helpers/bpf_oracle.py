"""The kernel as the judge of classic BPF programs: an oracle process in a test namespace
attaches each program to a real AF_PACKET socket (``SO_ATTACH_FILTER``) on a veth (Ethernet) or a
tun (raw IP), sends the test frames through the other end and reports what the socket received:
the indexes of frames that end with ``MARK`` and an index, and every frame received, as hex
(frames cut short carry no index). Run inside a namespace as ``python -m tests.helpers.bpf_oracle``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossensor_core.capture.bpf import LINKTYPE_RAW, BpfProgram
from tests.helpers.netns import Namespace, have_netns, namespaces

ROOT = Path(__file__).resolve().parents[2]
MARK = b"OSFT"  # test packets end with MARK and their index

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def _oracle() -> int:
    import fcntl

    from ossensor_core.capture.bpf import attach_filter

    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", b"tn0", IFF_TUN | IFF_NO_PI))
    subprocess.run(["ip", "link", "set", "tn0", "up"], check=True)
    sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sender.bind(("va", 0))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        raw = request["linktype"] == LINKTYPE_RAW
        receiver = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
        receiver.bind(("tn0" if raw else "vb", 0))
        program = BpfProgram("test", request["linktype"],
                             tuple(tuple(i) for i in request["program"]))
        attach_filter(receiver.fileno(), program)
        frames = [bytes.fromhex(f) for f in request["frames"]]
        # The end marker: a non-IP frame (Ethernet) or a truncated IPv4 header (raw), which the
        # generated part always hands to the user's program, and the tests' user programs keep;
        # or the request's own (a program that drops cut frames, as libpcap's did).
        marker = (bytes.fromhex(request["marker"]) if request.get("marker") else
                  b"\x45" + bytes(18) if raw else
                  b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + MARK + b"\xff\xff\xff\xff")
        for frame in [*frames, marker]:
            if raw:
                os.write(tun, frame)
            else:
                sender.send(frame)
        received: list[int] = []
        frames_seen: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([receiver], [], [], 0.5)
            if not ready:
                continue
            data = receiver.recv(65536)
            if data == marker:
                break
            frames_seen.append(data.hex())
            if data[-8:-4] == MARK:
                received.append(int.from_bytes(data[-4:], "big"))
        else:
            raise SystemExit("the marker never arrived")
        receiver.close()
        print(json.dumps({"received": received, "frames": frames_seen}), flush=True)
    return 0


class Kernel:
    """The test side of the oracle."""

    def __init__(self, ns: Namespace) -> None:
        ns.exec("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
        for name in ("va", "vb"):
            ns.exec("ip", "link", "set", name, "up")
        self.proc = ns.popen(sys.executable, "-m", "tests.helpers.bpf_oracle",
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert json.loads(self._line(20))["ready"]

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"oracle: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return line

    def accepted(self, program: BpfProgram, frames: list[bytes]) -> set[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"linktype": program.linktype,
                                          "program": program.instructions,
                                          "frames": [f.hex() for f in frames]}) + "\n")
        self.proc.stdin.flush()
        return set(json.loads(self._line(30))["received"])

    def frames(self, program: BpfProgram, frames: list[bytes], marker: bytes = b"") -> set[bytes]:
        """Every frame the socket received (cut frames included); ``marker``: a frame that
        ``program`` keeps, sent last (the default one is a cut IPv4 header on raw links)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"linktype": program.linktype,
                                          "program": program.instructions,
                                          "frames": [f.hex() for f in frames],
                                          "marker": marker.hex()}) + "\n")
        self.proc.stdin.flush()
        return {bytes.fromhex(f) for f in json.loads(self._line(30))["frames"]}

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def kernel_oracle() -> Iterator[Kernel]:
    """For a module-scoped fixture: the oracle in a namespace of its own, removed after."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (ns,):
        oracle = Kernel(ns)
        try:
            yield oracle
        finally:
            oracle.close()


if __name__ == "__main__":
    sys.exit(_oracle())
