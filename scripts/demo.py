#!/usr/bin/env python3
"""``make demo``: a reference vSensor and two sensors on two "nodes", real traffic between their
pods, then what the vSensor stored per sensor, read back with tshark, against tcpdump.

The layout is the test cluster of ``tests/helpers/cluster.py``: five network namespaces made here
(a bridge with the vSensor on 192.0.2.254, node A and node B on it, a pod behind each node) and
removed at the end; nothing is captured or sent in the machine's own network namespace. The
traffic: ping between the pods, DNS queries from pod B to a resolver on node A, an HTTPS
download by pod B from a web server in pod A, and a burst of numbered UDP datagrams from node A
to pod B. Each sensor keeps the flows whose lower address it owns (``docs/protocol.md``), so
every packet is stored once, by one of the two.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.cli import sensor_environment  # noqa: E402  (the repository's own test helpers)
from tests.helpers.cluster import VSensor, start_sensor, two_nodes, udp_sender  # noqa: E402

OUT = REPO / "demo-out"
WEB_PORT, DNS_PORT, UDP_PORT = 8444, 53, 9000

DNS_SERVER = r"""
import socket, struct, sys
# A tiny resolver: every A question is answered with the address given on the command line.
answer = socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    query, peer = s.recvfrom(512)
    end = query.index(b"\0", 12) + 5
    reply = query[:2] + b"\x81\x80" + query[4:6] + b"\0\x01\0\0\0\0" + query[12:end]
    reply += b"\xc0\x0c\0\x01\0\x01" + struct.pack("!IH", 60, 4) + answer
    s.sendto(reply, peer)
"""

DNS_CLIENT = r"""
import random, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for name in sys.argv[2:]:
    ident = random.randrange(65536)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
    s.sendto(struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question, (sys.argv[1], 53))
    reply = s.recv(512)
    print(name, "->", socket.inet_ntoa(reply[-4:]))
"""

WEB_SERVER = r"""
import http.server, ssl, sys
from pathlib import Path
from ossensor_vsensor.tls import ensure_self_signed
folder = Path(sys.argv[2])
cert, key, _ = ensure_self_signed(folder, sys.argv[1])
(folder / "download.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); context.load_cert_chain(cert, key)
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder))
server = http.server.HTTPServer((sys.argv[1], int(sys.argv[3])), handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""

WEB_CLIENT = r"""
import ssl, sys, urllib.request
context = ssl._create_unverified_context()  # the demo's throwaway self-signed certificate
body = urllib.request.urlopen(sys.argv[1], context=context, timeout=20).read()
print(f"downloaded {len(body)} bytes over HTTPS")
"""


def packet_id(frame: bytes) -> tuple | None:
    """An IPv4 packet, the same wherever it was captured (TTL and MAC addresses left out)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    return (ip[12:16], ip[16:20], ip[9], ip[4:6], ip[2:4], bytes(ip[ihl:ihl + 16]))


def read_frames(paths: list[Path]) -> list[bytes]:
    from scapy.utils import PcapNgReader, RawPcapReader

    frames: list[bytes] = []
    for path in paths:
        reader = PcapNgReader(str(path)) if path.suffix == ".pcapng" else RawPcapReader(str(path))
        with reader:
            frames += [bytes(p[0]) if isinstance(p, tuple) else bytes(p) for p in reader]
    return frames


def ready(proc: subprocess.Popen, what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"{what} did not start: {line}{proc.stderr.read() if proc.stderr else ''}")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="ossensor-demo-"))
    base_env = sensor_environment(work)
    base_env["VSENSOR_HMAC_KEY"] = "demo-key-" + os.urandom(8).hex()
    python = sys.executable
    codes: dict[str, int] = {}
    procs: list[subprocess.Popen] = []
    with two_nodes() as cluster:
        a, b = cluster.a, cluster.b
        vsensor = VSensor(cluster.net, OUT / "vsensor", base_env["VSENSOR_HMAC_KEY"])
        print(f"vSensor on 192.0.2.254:8443 (certificate SHA-256 {vsensor.fingerprint[:23]}...)")
        sensors = {}
        try:
            for node in (a, b):
                sensors[node.name] = start_sensor(node, vsensor, base_env, OUT)
            for sensor in sensors.values():
                sensor.wait_for_log("peer exclusion AddressSet\\([1-9]", timeout=30)
            print("sensors running on node-a and node-b, each knowing the other's ranges")
            port = next(p for p in cluster.net.exec("ip", "-o", "link", "show", "master",
                                                    "br0").stdout.split()
                        if p.startswith("bp")).rstrip(":").split("@")[0]
            reference = cluster.net.popen(
                "tcpdump", "-B", "131072", "-s", "262144", "-i", port, "-w",
                str(OUT / "tcpdump-node-a-port.pcap"), "not host 192.0.2.254",
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(reference)
            assert reference.stderr is not None
            reference.stderr.readline()  # "listening on ..."
            dns = a.ns.popen(python, "-c", DNS_SERVER, a.address, a.pod_address,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            web = a.pod.popen(python, "-c", WEB_SERVER, a.pod_address, str(work / "web"),
                              str(WEB_PORT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            procs += [dns, web]
            ready(dns, "the DNS server")
            ready(web, "the web server")
            print("\ntraffic:")
            ping = a.pod.exec("ping", "-c", "10", "-i", "0.1", b.pod_address, check=False)
            print(" ", ping.stdout.strip().splitlines()[-2] if ping.stdout else ping.stderr)
            out = b.pod.exec(python, "-c", DNS_CLIENT, a.address, "web.demo.internal",
                             "db.demo.internal", "api.demo.internal").stdout
            print("  DNS from pod-b to node-a:", ", ".join(out.split("\n")[:3]).strip(", "))
            out = b.pod.exec(python, "-c", WEB_CLIENT,
                             f"https://{a.pod_address}:{WEB_PORT}/download.bin").stdout
            print(" ", out.strip(), "(pod-b from pod-a)")
            burst = udp_sender(a.ns, b.pod_address, UDP_PORT, 2000, pace=20)
            burst.wait(timeout=60)
            print("  2000 numbered UDP datagrams from node-a to pod-b")
            time.sleep(1.5)  # the last ring blocks and chunks are handed over
            for name, sensor in sensors.items():
                codes[name], _ = sensor.terminate(timeout=30)
            reference.send_signal(signal.SIGINT)
            reference.wait(timeout=10)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            vsensor.stop()
    shutil.rmtree(work, ignore_errors=True)

    print("\nwhat the vSensor stored:")
    stored: Counter = Counter()
    for name in ("node-a", "node-b"):
        files = sorted((OUT / "vsensor" / name).glob("*.pcapng"))
        ids = [i for i in map(packet_id, read_frames(files)) if i is not None]
        stored.update(ids)
        print(f"  {name} (exit code {codes.get(name)}): {len(files)} file(s), {len(ids)} IPv4 "
              f"packets, in {OUT / 'vsensor' / name}")
        for path in files:
            hierarchy = subprocess.run(["tshark", "-q", "-r", str(path), "-z", "io,phs"],
                                       capture_output=True, text=True).stdout
            lines = [line.strip() for line in hierarchy.splitlines()
                     if line.strip().split(" ")[0] in ("ip", "icmp", "udp", "tcp", "dns", "tls",
                                                       "data")]
            print("    tshark:", "; ".join(" ".join(line.split()[:2]) for line in lines))
    expected = Counter(i for i in map(packet_id, read_frames([OUT / "tcpdump-node-a-port.pcap"]))
                       if i is not None)
    missing = sum((expected - stored).values())
    twice = sum(1 for n in stored.values() if n > 1)
    print(f"\ntcpdump on node-a's bridge port saw {sum(expected.values())} packets of the demo; "
          f"the two sensors stored {sum((stored & expected).values())} of them, {missing} "
          f"missing, {twice} stored twice")
    ok = all(code == 0 for code in codes.values()) and len(codes) == 2 and missing == 0 \
        and twice == 0 and expected
    print("demo:", "ok" if ok else "FAILED", f"(logs in {OUT})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
