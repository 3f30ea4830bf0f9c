"""The scapy capture backend against tcpdump, on a veth pair between two namespaces.

The sensor runs inside the receiving namespace (never the host's) as a small script that goes
through the real start-up (``prepare``), opens the ``scapy`` backend, and stores what it read with
the ``file`` transport. tcpdump captures the same interface at the same time; the two captures
must hold the same packets, byte for byte, with the same lengths and nanosecond timestamps, in
the same order per direction (see :func:`_compare` for the exceptions the kernel imposes).
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cli import sensor_environment
from tests.helpers.netns import Namespace, veth_pair

pytestmark = pytest.mark.netns

TCP_BYTES = 4 << 20
SETTLE = 1.2  # seconds between the last packet and stopping the captures

# The sensor, run inside the receiving namespace. Reads commands on stdin: "filter EXPR" swaps
# the kernel filter, "stop" (or end of input) stores what was read and prints the counters.
CAPTURE_SCRIPT = r'''
import asyncio, json, os, select, sys, time
from ossensor_core.capture.bpf import compile_filter
from ossensor_core.pipeline.contracts import Chunk
from ossensor_core.pipeline.startup import prepare

prepared = prepare(os.environ, write_config=False)
config = prepared.config
(interface,) = prepared.selected
hook = prepared.plugins.hook
capture = hook.ossensor_capture_backend(config=config).open(
    interface, prepared.program(interface.linktype))
transport = hook.ossensor_transport(config=config,
                                    encoder=hook.ossensor_chunk_encoder(config=config))
print("ready", capture.linktype, flush=True)
batches = []
pending = b""
deadline = time.monotonic() + 120
running = True
while running and time.monotonic() < deadline:
    readable, _, _ = select.select([capture.fileno(), 0], [], [], 1.0)
    if capture.fileno() in readable:
        batches += capture.read()
    if 0 in readable:
        data = os.read(0, 4096)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            line = line.decode().strip()
            if line.startswith("filter "):
                capture.set_filter(compile_filter(line[len("filter "):], capture.linktype))
                print("filtered", flush=True)
            else:
                running = False
        if not data:
            running = False
while True:
    more = capture.read()
    if not more:
        break
    batches += more
stats = capture.stats()
capture.close()


async def store():
    await transport.start()
    await transport.send(Chunk(config.name, 0, tuple(batches), time.time_ns()))
    await transport.aclose()

asyncio.run(store())
print(json.dumps({"packets": stats.packets, "drops": stats.drops,
                  "read": sum(b.count for b in batches), "files": transport.files_written}),
      flush=True)
'''

UDP_SENDER = r'''
import socket, sys, time
destination, ports, sizes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    for size in map(int, sizes):
        for port in map(int, ports):
            sock.sendto(bytes(i & 0xFF for i in range(size)), (destination, port))
            time.sleep(0.002)
'''

TCP_SERVER = r'''
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as server:
    server.settimeout(30)
    print("listening", flush=True)
    connection, _ = server.accept()
    connection.settimeout(30)
    total = 0
    while data := connection.recv(1 << 20):
        total += len(data)
    connection.close()
    print(total, flush=True)
'''

TCP_CLIENT = r'''
import os, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as sock:
    sock.sendall(os.urandom(int(sys.argv[3])))
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(4096):
        pass
'''

# Attaches to a tun device, brings it up, and writes ICMP echo requests of several sizes into it
# (they arrive on tun0 as bare IP); the kernel's replies leave through tun0 and are read back.
TUN_PEER = r'''
import fcntl, os, select, struct, subprocess, sys, time
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tun0", IFF_TUN | IFF_NO_PI))
subprocess.run(["ip", "addr", "add", "198.51.100.1/24", "dev", "tun0"], check=True)
subprocess.run(["ip", "link", "set", "tun0", "up"], check=True)
print("up", flush=True)
sys.stdin.readline()  # the capture is ready


def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


replies = 0
for sequence, size in enumerate((0, 56, 1000, 1400)):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, sequence) + bytes(size)
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), sequence, 0, 64, 1, 0,
                         bytes([198, 51, 100, 2]), bytes([198, 51, 100, 1]))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    os.write(fd, header + icmp)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            packet = os.read(fd, 65536)
            if packet[0] >> 4 == 4 and packet[9] == 1 and packet[20] == 0:
                replies += 1
                break
print(replies, flush=True)
sys.stdin.readline()  # the capture has stopped
'''


@dataclass(frozen=True)
class Frame:
    timestamp_ns: int
    wire_length: int
    data: bytes


class Lines:
    """The stdout of a child process, line by line, with a timeout (never hangs the test)."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.queue.put(line.decode(errors="replace").rstrip("\n"))
        self.queue.put(None)

    def next(self, timeout: float = 30.0) -> str:
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None
        if line is None:
            raise AssertionError("the process ended early")
        return line

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = self.next(max(0.1, deadline - time.monotonic()))
            except AssertionError as exc:
                raise AssertionError(f"waiting for {prefix!r}: {exc}; saw {seen[-10:]}") from None
            if line.startswith(prefix):
                return line
            seen.append(line)


def _no_ipv6(*namespaces: Namespace) -> None:
    """No router solicitations or MLD reports: only the test's own traffic on the link."""
    for ns in namespaces:
        for scope in ("all", "default"):
            ns.exec("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")


@contextmanager
def _tcpdump(ns: Namespace, interface: str, path: Path,
             expression: str = "") -> Iterator[subprocess.Popen]:
    """tcpdump writing ``path`` (nanosecond pcap, 128 MiB buffer) until the block ends.

    Immediate mode, and :data:`SETTLE` seconds of quiet before the end: tcpdump reads its
    TPACKET_V3 ring a block at a time, and a block the kernel has not retired yet when tcpdump
    is stopped is never written.
    """
    command = ["tcpdump", "-i", interface, "-B", "131072", "-s", "262144", "-nn", "-Z", "root",
               "--immediate-mode", "--time-stamp-precision=nano", "-w", str(path)]
    proc = ns.popen(*command, *([expression] if expression else []),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        Lines(proc.stderr).wait_for("tcpdump: listening on")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _sensor(ns: Namespace, tmp_path: Path, interface: str,
            bpf: str = "") -> Iterator[tuple[subprocess.Popen, Lines]]:
    """The capture script in ``ns``; the block's traffic goes between ready and stop."""
    script = tmp_path / "sensor.py"
    script.write_text(CAPTURE_SCRIPT)
    env = sensor_environment(
        tmp_path, OSSENSOR_NAME="e2e", OSSENSOR_NETWORK_DEVICE=interface,
        OSSENSOR_CAPTURE_BACKEND="scapy", BPF=bpf,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = ns.popen(sys.executable, str(script), env=env, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = Lines(proc.stdout)
    try:
        try:
            lines.wait_for("ready", timeout=60)
        except AssertionError:
            proc.kill()
            raise AssertionError(f"the sensor did not start: {proc.stderr.read().decode()}")
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _stop(proc: subprocess.Popen, lines: Lines) -> dict:
    """Ask the sensor to store what it read; return its counters."""
    proc.stdin.write(b"stop\n")
    proc.stdin.close()
    try:
        result = json.loads(lines.wait_for("{", timeout=60))
    except AssertionError:
        proc.kill()
        raise AssertionError(f"the sensor failed: {proc.stderr.read().decode()}") from None
    assert proc.wait(timeout=30) == 0
    return result


def _read_pcap(path: Path) -> list[Frame]:
    """A classic pcap file with nanosecond timestamps, as tcpdump wrote it."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic == 0xA1B23C4D, "tcpdump wrote microsecond timestamps"
    frames, position = [], 24
    while position < len(data):
        seconds, nanoseconds, caplen, length = struct.unpack_from("<IIII", data, position)
        position += 16
        frames.append(Frame(seconds * 1_000_000_000 + nanoseconds, length,
                            data[position:position + caplen]))
        position += caplen
    return frames


def _read_output(directory: Path, linktype_name: str) -> tuple[list[Frame], set[str]]:
    """The sensor's pcapng files of one link type: the frames and the interface names."""
    from scapy.utils import RawPcapNgReader

    files = sorted(directory.glob(f"*-{linktype_name}.pcapng"))
    assert files, f"no {linktype_name} file in {sorted(p.name for p in directory.iterdir())}"
    assert not list(directory.glob("*.part"))
    frames, names = [], set()
    for path in files:
        with RawPcapNgReader(str(path)) as reader:
            for data, meta in reader:
                assert meta.tsresol == 1_000_000_000
                frames.append(Frame((meta.tshigh << 32) | meta.tslow, meta.wirelen, data))
                names.add(meta.ifname.decode() if isinstance(meta.ifname, bytes)
                          else meta.ifname)
    return frames, names


def _is_tcp(frame: Frame) -> bool:
    return frame.data[12:14] == b"\x08\x00" and frame.data[23] == 6


def _describe(frames: Sequence[Frame]) -> str:
    return "; ".join(f"{f.timestamp_ns} len {f.wire_length} {f.data[:48].hex()}"
                     for f in frames[:10])


def _compare(ours: Sequence[Frame], reference: Sequence[Frame]) -> None:
    """Same packets, byte for byte, with the same lengths, in the same order per direction.

    Packets of one direction reach every packet socket in the order the kernel handled them;
    packets of opposite directions handled at the same moment on two CPUs may reach two sockets
    interleaved differently, so the order is compared per direction (source MAC address).

    Timestamps: both sockets see the time the kernel stamped the packet, to the nanosecond,
    except for TCP packets that arrive carrying the sender's departure time (TCP's pacing clock,
    which veth passes across namespaces): the ring that tcpdump reads then takes the time of the
    copy, recvmsg another moment of the same delivery, microseconds apart.
    """
    def by_source(frames: Sequence[Frame]) -> dict[bytes, list[Frame]]:
        found: dict[bytes, list[Frame]] = {}
        for frame in frames:
            found.setdefault(frame.data[6:12], []).append(frame)
        return found

    ours_by_source, reference_by_source = by_source(ours), by_source(reference)
    problems = []
    for source in sorted(ours_by_source.keys() | reference_by_source.keys()):
        mine, theirs = ours_by_source.get(source, []), reference_by_source.get(source, [])
        if [(f.data, f.wire_length) for f in mine] != [(f.data, f.wire_length) for f in theirs]:
            mine_data, theirs_data = {f.data for f in mine}, {f.data for f in theirs}
            missing = [f for f in theirs if f.data not in mine_data]
            extra = [f for f in mine if f.data not in theirs_data]
            problems.append(f"from {source.hex(':')}: {len(mine)} packets captured, tcpdump "
                            f"has {len(theirs)}; missing: {_describe(missing)}; "
                            f"extra: {_describe(extra)}")
            continue
        late = [(a, b) for a, b in zip(mine, theirs) if not _same_time(a, b)]
        if late:
            problems.append(f"from {source.hex(':')}: {len(late)} timestamps differ, first "
                            f"{late[0][0].timestamp_ns} != {late[0][1].timestamp_ns} "
                            f"({_describe([late[0][0]])})")
    assert not problems, "\n".join(problems)
    assert len(ours) == len(reference)


def _same_time(a: Frame, b: Frame) -> bool:
    if _is_tcp(a):
        return abs(a.timestamp_ns - b.timestamp_ns) < 20_000_000
    return a.timestamp_ns == b.timestamp_ns


def _run(ns: Namespace, script: str, *args: str) -> str:
    """Run a Python snippet in ``ns`` (tests.helpers.netns bounds it to 60 s)."""
    return ns.exec(sys.executable, "-c", script, *args).stdout


def test_same_packets_as_tcpdump(netns_pair, tmp_path: Path) -> None:
    """UDP of many sizes (fragments included), ICMP, and a 4 MB TCP transfer with TSO."""
    sender, receiver = netns_pair
    _no_ipv6(sender, receiver)
    with veth_pair(sender, receiver) as (_, rx):
        reference = tmp_path / "ref.pcap"
        with _tcpdump(receiver, rx, reference), _sensor(receiver, tmp_path, rx) as (proc, lines):
            server = receiver.popen(sys.executable, "-c", TCP_SERVER, "192.0.2.2", "5001",
                                    stdout=subprocess.PIPE)
            server_lines = Lines(server.stdout)
            try:
                server_lines.wait_for("listening")
                sizes = [0, 1, 17, 18, 46, 100, 512, 1000, 1471, 1472, 1473, 2000, 4000, 9000,
                         30000, 65507]
                _run(sender, UDP_SENDER, "192.0.2.2", "7000,7001",
                     ",".join(map(str, sizes)))
                for size in ("0", "56", "1400", "3000"):
                    sender.exec("ping", "-c", "2", "-i", "0.05", "-W", "2", "-s", size,
                                "192.0.2.2")
                _run(sender, TCP_CLIENT, "192.0.2.2", "5001", str(TCP_BYTES))
                assert int(server_lines.next()) == TCP_BYTES
            finally:
                if server.poll() is None:
                    server.kill()
                server.wait(timeout=10)
            time.sleep(SETTLE)
            result = _stop(proc, lines)

    ours, names = _read_output(tmp_path / "out", "ether")
    assert names == {rx}
    _compare(ours, _read_pcap(reference))
    assert result == {"packets": len(ours), "drops": 0, "read": len(ours), "files": 1}
    tcp = [f for f in ours if f.data[12:14] == b"\x08\x00" and f.data[23] == 6]
    assert max(len(f.data) for f in tcp) > 1514, "no TSO frame: was TSO off on the veth?"
    udp_payloads = {len(f.data) - 42 for f in ours
                    if f.data[12:14] == b"\x08\x00" and f.data[23] == 17
                    and struct.unpack_from("!H", f.data, 20)[0] & 0x3FFF == 0}  # not fragments
    assert {s for s in sizes if s <= 1472} <= udp_payloads


def test_kernel_filter_keeps_other_packets_in_the_kernel(netns_pair, tmp_path: Path) -> None:
    """With ``udp port 9999`` only those packets reach user space, counted by the kernel; a
    filter swapped at run time applies from then on."""
    sender, receiver = netns_pair
    _no_ipv6(sender, receiver)
    with veth_pair(sender, receiver) as (_, rx):
        reference = tmp_path / "ref.pcap"
        with _tcpdump(receiver, rx, reference), \
                _sensor(receiver, tmp_path, rx, bpf="udp port 9999") as (proc, lines):
            _run(sender, UDP_SENDER, "192.0.2.2", "9998,9999,10000", "10,200,1000")
            sender.exec("ping", "-c", "2", "-i", "0.05", "-W", "2", "192.0.2.2")
            time.sleep(0.3)
            proc.stdin.write(b"filter udp port 10000\n")
            proc.stdin.flush()
            lines.wait_for("filtered")
            _run(sender, UDP_SENDER, "192.0.2.2", "9999,10000", "30,300")
            time.sleep(SETTLE)
            result = _stop(proc, lines)

    def port(frame: Frame) -> int | None:
        data = frame.data
        if data[12:14] == b"\x08\x00" and data[23] == 17:
            return struct.unpack_from("!H", data, 14 + (data[14] & 0xF) * 4 + 2)[0]
        return None

    everything = _read_pcap(reference)
    assert {port(f) for f in everything} >= {9998, 9999, 10000, None}, \
        "the other packets did not reach the interface"
    ours, _ = _read_output(tmp_path / "out", "ether")
    assert [port(f) for f in ours] == [9999] * 3 + [10000] * 2
    expected = [f for f in everything if (port(f), len(f.data) - 42) in
                {(9999, 10), (9999, 200), (9999, 1000), (10000, 30), (10000, 300)}]
    assert ours == expected
    assert result == {"packets": 5, "drops": 0, "read": 5, "files": 1}


def test_raw_ip_on_a_tun_device(netns, tmp_path: Path) -> None:
    """A tun device delivers bare IP packets (link type 101) in both directions."""
    _no_ipv6(netns)
    peer = netns.popen(sys.executable, "-c", TUN_PEER, stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peer_lines = Lines(peer.stdout)
    try:
        peer_lines.wait_for("up")
        reference = tmp_path / "ref.pcap"
        with _tcpdump(netns, "tun0", reference), \
                _sensor(netns, tmp_path, "tun0", bpf="icmp") as (proc, lines):
            peer.stdin.write(b"go\n")
            peer.stdin.flush()
            assert int(peer_lines.next()) == 4
            time.sleep(SETTLE)
            result = _stop(proc, lines)
        peer.stdin.write(b"done\n")
        peer.stdin.flush()
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(timeout=10)

    ours, names = _read_output(tmp_path / "out", "raw")
    assert names == {"tun0"}
    reference_frames = _read_pcap(reference)
    assert [f.data[9] for f in ours] == [1] * 8  # requests and replies, all bare IPv4 ICMP
    assert ours == [f for f in reference_frames if f.data[0] >> 4 == 4 and f.data[9] == 1]
    assert result["drops"] == 0 and result["read"] == 8


OPEN_ERRORS = r'''
import dataclasses, sys
from ossensor_core.capture.bpf import compile_filter
from ossensor_core.errors import CaptureError
from ossensor_core.node.interfaces import list_interfaces
from ossensor_plugins.capture_scapy import ScapyBackend

interfaces = {i.name: i for i in list_interfaces()}
rx, backend, ether = interfaces[sys.argv[1]], ScapyBackend(), compile_filter("", 1)
cases = {
    "open": (rx, ether),
    "gone": (dataclasses.replace(rx, name="gone0", index=999), ether),
    "loopback": (interfaces["lo"], ether),
    "linktype": (rx, compile_filter("", 101)),
}
for case, (interface, program) in cases.items():
    try:
        capture = backend.open(interface, program)
    except CaptureError as exc:
        print(case, "|", exc, "|", type(exc.__cause__).__name__, flush=True)
        continue
    capture.close()
    capture.close()
    try:
        capture.read()
    except CaptureError as exc:
        print(case, "|", "closed:", exc, "|", capture.fileno(), flush=True)
'''


def test_open_errors_name_the_interface_and_the_cause(netns_pair) -> None:
    sender, receiver = netns_pair
    with veth_pair(sender, receiver) as (_, rx):
        lines = dict(line.split(" | ", 1) for line in
                     _run(receiver, OPEN_ERRORS, rx).splitlines())
        assert lines == {
            "open": "closed: capture on rx0 is closed | -1",
            "gone": "cannot capture on gone0: Interface 'gone0' not found ! | ValueError",
            "loopback": "cannot capture on lo: its link type (ARPHRD 772) is not supported "
                        "| NoneType",
            "linktype": "cannot capture on rx0: the filter was compiled for link type 101, the "
                        "interface has 1 | NoneType",
        }
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is not installed: cannot drop CAP_NET_RAW")
        # Root without CAP_NET_RAW (dropped from the bounding set) cannot open a packet socket.
        result = receiver.exec("setpriv", "--bounding-set=-net_raw", sys.executable, "-c",
                               OPEN_ERRORS, rx)
        assert result.stdout.splitlines()[0] == (
            "open | cannot capture on rx0: needs CAP_NET_RAW (Operation not permitted) "
            "| PermissionError")
