#!/usr/bin/env python3
"""``make demo``: run the reference vSensor and the sensor inside a network namespace, send
generated traffic, then show what the vSensor stored, read back with tcpdump and tshark, beside
what tcpdump itself captured on the same interface.

Everything happens in two namespaces made here (192.0.2.0/24, TEST-NET-1) and is removed at
the end; nothing is captured or sent in the machine's own network namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "demo-out"
TAG = f"osdemo{os.getpid() % 100000}"
TX, RX = f"{TAG}tx", f"{TAG}rx"


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=True, timeout=120, **kwargs)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def setup_namespaces() -> None:
    for ns in (TX, RX):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", f"{TAG}a", "netns", TX, "type", "veth", "peer", "name", f"{TAG}b",
       "netns", RX)
    sh("ip", "-n", TX, "link", "set", f"{TAG}a", "name", "eth0")
    sh("ip", "-n", RX, "link", "set", f"{TAG}b", "name", "eth0")
    sh("ip", "-n", TX, "addr", "add", "192.0.2.1/24", "dev", "eth0")
    sh("ip", "-n", RX, "addr", "add", "192.0.2.2/24", "dev", "eth0")
    for ns in (TX, RX):
        sh("ip", "-n", ns, "link", "set", "eth0", "up")


def teardown_namespaces() -> None:
    for ns in (TX, RX):
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", ns, check=False)


TRAFFIC = r"""
import socket, time, sys
# UDP: 2000 datagrams of varied sizes, paced so nothing needs to be dropped anywhere.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(2000):
    u.sendto(i.to_bytes(4, "big") * (1 + i % 300), ("192.0.2.2", 9000))
    if i % 100 == 99:
        time.sleep(0.01)
# TCP: 2 MB to the receiver started in the other namespace.
t = socket.create_connection(("192.0.2.2", 9001), timeout=10)
t.sendall(b"x" * 2_000_000)
t.close()
"""

RECEIVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("192.0.2.2", 9001)); s.listen(1); s.settimeout(30)
c, _ = s.accept()
while c.recv(1 << 16):
    pass
"""


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    key = "demoKey2026"
    env = dict(os.environ, VSENSOR_HOSTNAME="127.0.0.1", VSENSOR_PORT="8443",
               VSENSOR_HMAC_KEY=key, OSSENSOR_TRANSPORT="https",
               OSSENSOR_SPOOL_DIR=str(OUT / "spool"),
               OSSENSOR_CONFIG_PATH=str(OUT / "ossensor.cfg"), OSSENSOR_NAME="demo-node",
               OSSENSOR_DEBUG="1", OSSENSOR_STATS_SECONDS="2", ANTIGENA_ENABLED="false",
               PYTHONPATH=str(REPO))
    setup_namespaces()
    sensor = reference = receiver = vsensor = None
    try:
        vsensor_log = OUT / "vsensor.log"
        vsensor = subprocess.Popen(
            in_ns(RX, sys.executable, "-m", "ossensor_vsensor.cli", "--listen", "127.0.0.1:8443",
                  "--data-dir", str(OUT / "vsensor"), "--heartbeat-seconds", "2"),
            env=dict(os.environ, VSENSOR_HMAC_KEY=key), stdout=subprocess.DEVNULL,
            stderr=open(vsensor_log, "w"))
        deadline = time.monotonic() + 20
        while not (found := re.search(r"fingerprint: ([0-9A-Fa-f:]+)", vsensor_log.read_text())):
            if vsensor.poll() is not None or time.monotonic() > deadline:
                print(vsensor_log.read_text())
                print("the vSensor did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        env["VSENSOR_TLS_FINGERPRINT"] = found.group(1)
        print(f"vSensor listening on 127.0.0.1:8443 in namespace {RX} "
              f"(certificate SHA-256 {found.group(1)[:23]}...)")
        log = open(OUT / "sensor.log", "w")
        sensor = subprocess.Popen(in_ns(RX, sys.executable, "-m", "ossensor_core.cli"), env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        reference = subprocess.Popen(in_ns(RX, "tcpdump", "-B", "131072", "-i", "eth0", "-w",
                                           str(OUT / "tcpdump-reference.pcap"), "-U"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while "kernel filter is now" not in (OUT / "sensor.log").read_text():
            if sensor.poll() is not None or time.monotonic() > deadline:
                print((OUT / "sensor.log").read_text())
                print("the sensor did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        time.sleep(1)
        print("sensor running in namespace", RX, "- sending traffic from", TX)
        receiver = subprocess.Popen(in_ns(RX, sys.executable, "-c", RECEIVER))
        time.sleep(0.3)
        sh(*in_ns(TX, "ping", "-c", "5", "-i", "0.2", "192.0.2.2"), check=False)
        sh(*in_ns(TX, sys.executable, "-c", TRAFFIC))
        receiver.wait(timeout=30)
        time.sleep(1.5)
        sensor.send_signal(signal.SIGTERM)
        code = sensor.wait(timeout=15)
        reference.send_signal(signal.SIGINT)
        reference.wait(timeout=10)
        vsensor.send_signal(signal.SIGTERM)
        vsensor.wait(timeout=15)
    finally:
        for proc in (sensor, reference, receiver, vsensor):
            if proc is not None and proc.poll() is None:
                proc.kill()
        teardown_namespaces()

    files = sorted((OUT / "vsensor" / "demo-node").glob("*.pcapng"))
    print(f"\nsensor exited with {code}; files the vSensor stored in "
          f"{OUT / 'vsensor' / 'demo-node'}:")
    ours = "udp port 9000 or tcp port 9001 or icmp"  # the demo's own traffic, in both captures
    stored = generated = 0
    for path in files:
        count = len(sh("tcpdump", "-nn", "-r", str(path)).stdout.splitlines())
        generated += len(sh("tcpdump", "-nn", "-r", str(path), ours).stdout.splitlines())
        stored += count
        print(f"  {path.name}  {path.stat().st_size} bytes, {count} packets")
    reference = str(OUT / "tcpdump-reference.pcap")
    reference_count = len(sh("tcpdump", "-nn", "-r", reference, ours).stdout.splitlines())
    print(f"\npackets the vSensor stored: {stored} in all, {generated} of the demo's traffic; "
          f"tcpdump captured {reference_count} of the demo's traffic on the same interface")
    if files:
        print("\nfirst packets, as tcpdump reads the vSensor's file:")
        print("\n".join(sh("tcpdump", "-nn", "-r", str(files[0]), "-c", "8").stdout.splitlines()))
        print("\nprotocol hierarchy (tshark):")
        print(sh("tshark", "-q", "-r", str(files[0]), "-z", "io,phs").stdout.strip())
    print("\nthe sensor's log:", OUT / "sensor.log")
    print("\n".join((OUT / "sensor.log").read_text().splitlines()[-6:]))
    return 0 if code == 0 and files and generated == reference_count else 1


if __name__ == "__main__":
    sys.exit(main())
