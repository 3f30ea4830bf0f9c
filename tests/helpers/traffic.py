"""Traffic and capture helpers for end-to-end tests, run inside test namespaces.

Tests start these as ``ns.popen(sys.executable, "-m", "tests.helpers.traffic", COMMAND, ...)`` from
the repository root, so that every socket lives in a namespace the test created. Each command
prints one JSON line when it is ready (if it waits) and one when it is done. Only the standard
library is imported at module level: a helper starts in a fraction of a second.

Commands:
    capture   open an ossensor capture backend on an interface, write pcapng, report counters
    udp       send UDP datagrams of given sizes (optionally numbered) to given ports
    ether     send raw Ethernet frames, optionally VLAN-tagged, from a packet socket
    tcp-sink  accept one TCP connection and read it to the end
    tcp-send  send N bytes over one TCP connection
    tun       hold a tun device open (carrier up) and write IP packets into it on request

Test-side wrappers (:class:`CaptureProcess`, :class:`Tcpdump`, :func:`run_helper`) start them and
always stop what they started.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ossensor_plugins.antigena.craft import checksum as _checksum

ROOT = Path(__file__).resolve().parents[2]
SEQ_MAGIC = b"OSSQ"  # numbered datagrams start with this and a big-endian u32 sequence number

# -------------------------------------------------------------------------------------------
# Commands (run inside a namespace)
# -------------------------------------------------------------------------------------------


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def parse_sizes(spec: str) -> list[int]:
    """``"1-1472,2000,8000"`` -> every size in the ranges, in order."""
    sizes: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-")
            sizes.extend(range(int(low), int(high) + 1))
        elif part:
            sizes.append(int(part))
    return sizes


def cmd_capture(args: argparse.Namespace) -> int:
    """Capture with the afpacket backend until told to stop, then write pcapng and counters."""
    from ossensor_plugins.capture_afpacket import AfPacketBackend

    from ossensor_core.capture.batch import TP_STATUS_VLAN_VALID
    from ossensor_core.capture.bpf import compile_filter
    from ossensor_core.node.interfaces import list_interfaces
    from ossensor_core.wire.pcapng import PcapngWriter

    interfaces = {i.name: i for i in list_interfaces()}
    interface = interfaces[args.interface]
    assert interface.linktype is not None
    backend = AfPacketBackend(args.block_size, args.block_count, args.block_timeout_ms)
    programs = [compile_filter(expr, interface.linktype) for expr in [args.filter, *args.swap]]
    source = backend.open(interface, programs[0])
    written = batches = largest_batch = vlan_valid = swaps = 0
    with open(args.out, "wb") as out:
        writer = PcapngWriter(out, source.linktype)
        _emit(ready=True, linktype=source.linktype, program_length=len(programs[0]))
        start = time.monotonic()
        hard_stop = start + args.timeout
        stop_at: float | None = None
        next_swap = start + args.swap_interval
        next_stats = start + args.stats_interval
        watched = [source.fileno(), sys.stdin.fileno()]
        while True:
            now = time.monotonic()
            if now >= hard_stop or (stop_at is not None and now >= stop_at):
                break
            readable, _, _ = select.select(watched, [], [], 0.02)
            if sys.stdin.fileno() in readable:
                line = sys.stdin.readline()
                watched.remove(sys.stdin.fileno())
                if line.strip() == "stop" or not line:
                    stop_at = time.monotonic() + args.drain
            for batch in source.read():
                batches += 1
                largest_batch = max(largest_batch, batch.count)
                vlan_valid += sum(1 for h in batch.headers() if h[5] & TP_STATUS_VLAN_VALID)
                written += writer.write_batch(batch)
            if len(programs) > 1 and stop_at is None and time.monotonic() >= next_swap:
                swaps += 1
                source.set_filter(programs[swaps % len(programs)])
                next_swap += args.swap_interval
            if time.monotonic() >= next_stats:  # as the sensor does: the kernel resets on read
                source.stats()
                next_stats += args.stats_interval
    stats = source.stats()
    source.close()
    source.close()  # idempotent
    after = source.stats()
    _emit(done=True, written=written, batches=batches, largest_batch=largest_batch,
          vlan_valid=vlan_valid, swaps=swaps, packets=stats.packets, drops=stats.drops,
          packets_after_close=after.packets, drops_after_close=after.drops,
          freezes=source.freezes)
    return 0


def cmd_udp(args: argparse.Namespace) -> int:
    """Send one datagram per size (cycling through ports), pausing now and then."""
    family = socket.AF_INET6 if ":" in args.dst else socket.AF_INET
    sizes = parse_sizes(args.sizes)
    ports = [int(p) for p in args.ports.split(",")]
    total = args.count or len(sizes) * len(ports)
    sent: dict[int, int] = {}
    started = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if args.src:
            sock.bind((args.src, 0))
        for n in range(total):
            size = sizes[n % len(sizes)]
            port = ports[n % len(ports)]
            if args.seq:
                body = SEQ_MAGIC + struct.pack("!I", n)
                payload = (body + bytes(max(0, size - len(body))))[:max(size, len(body))]
            else:
                payload = bytes((n + i) & 0xFF for i in range(size)) if size < 64 else \
                    bytes([n & 0xFF]) * size
            for _ in range(50):
                try:
                    sock.sendto(payload, (args.dst, port))
                    break
                except OSError:  # ENOBUFS or a pending ICMP error: try again shortly
                    time.sleep(0.001)
            else:
                raise SystemExit(f"cannot send datagram {n}")
            sent[port] = sent.get(port, 0) + 1
            if args.rate:  # on a schedule, in bursts of 50: no drift over hours
                if n % 50 == 49 and (due := started + (n + 1) / args.rate - time.monotonic()) > 0:
                    time.sleep(due)
            elif args.pace and n % args.pace == args.pace - 1:
                time.sleep(0.001)
    _emit(done=True, sent=total, per_port=sent)
    return 0


def cmd_ether(args: argparse.Namespace) -> int:
    """Send Ethernet frames, 802.1Q/802.1ad-tagged as given, carrying UDP/IPv4, from a packet
    socket: no VLAN driver needed (the receiving kernel strips the outer tag itself)."""
    src_mac = Path(f"/sys/class/net/{args.interface}/address").read_text().strip()
    tags = b"".join(struct.pack("!HH", int(tpid, 0), int(tci, 0))
                    for tpid, tci in (tag.split(":") for tag in args.tags.split(",") if tag))
    head = bytes.fromhex(args.dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    sizes = parse_sizes(args.sizes)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((args.interface, 0))
        for n in range(args.count or len(sizes)):
            body = bytes([n & 0xFF]) * sizes[n % len(sizes)]
            packet = udp4_packet(args.src, args.dst, 40000, 9999, body, n)
            sock.send(head + tags + b"\x08\x00" + packet)
            if n % 20 == 19:
                time.sleep(0.001)
    _emit(done=True, sent=args.count or len(sizes))
    return 0


def cmd_tcp_sink(args: argparse.Namespace) -> int:
    with socket.create_server((args.bind, args.port)) as server:
        _emit(ready=True)
        server.settimeout(args.timeout)
        conn, _ = server.accept()
        total = 0
        with conn:
            conn.settimeout(args.timeout)
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
    _emit(done=True, received=total)
    return 0


def cmd_tcp_send(args: argparse.Namespace) -> int:
    data = bytes(range(256)) * (args.bytes // 256 + 1)
    with socket.create_connection((args.dst, args.port), timeout=args.timeout) as conn:
        conn.sendall(data[:args.bytes])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the peer's close, so the whole exchange is on the wire
    _emit(done=True, sent=args.bytes)
    return 0


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident & 0xFFFF, 0, 64,
                         proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def udp4_packet(src: str, dst: str, sport: int, dport: int, body: bytes, ident: int) -> bytes:
    length = 8 + len(body)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    checksum = _checksum(pseudo + header + body) or 0xFFFF
    return ipv4_packet(src, dst, 17, header[:6] + struct.pack("!H", checksum) + body, ident)


def icmp4_echo(src: str, dst: str, ident: int, seq: int, body: bytes) -> bytes:
    message = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + body
    message = message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
    return ipv4_packet(src, dst, 1, message, seq)


def udp6_packet(src: str, dst: str, sport: int, dport: int, body: bytes) -> bytes:
    length = 8 + len(body)
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    checksum = _checksum(s + d + struct.pack("!I3xB", length, 17) + header + body) or 0xFFFF
    udp = header[:6] + struct.pack("!H", checksum) + body
    return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, s, d) + udp


def tun_packets(count: int) -> Iterator[bytes]:
    """IPv4 UDP and ICMP echo and IPv6 UDP, from a host behind the tun to the tun's address."""
    sizes = [0, 1, 2, 7, 64, 100, 512, 1000, 1400, 1452]
    for n in range(count):
        size = sizes[n % len(sizes)]
        kind = n % 3
        body = bytes([n & 0xFF]) * size
        if kind == 0:
            yield udp4_packet("192.0.2.99", "192.0.2.1", 40000 + n, 9, body, n)
        elif kind == 1:
            yield icmp4_echo("192.0.2.99", "192.0.2.1", 0x4242, n, body)
        else:
            yield udp6_packet("2001:db8::99", "2001:db8::1", 40000 + n, 9, body[:1400])


TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def cmd_tun(args: argparse.Namespace) -> int:
    """Attach to a tun device (its carrier comes up), then write packets when told "go"."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", args.name.encode(), IFF_TUN | IFF_NO_PI))
    _emit(ready=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        written = 0
        for packet in tun_packets(args.count):
            os.write(fd, packet)
            written += 1
            if written % 20 == 0:
                time.sleep(0.001)
        # Drain what the kernel sent back (ICMP replies) so the device queue never fills.
        time.sleep(0.2)
        replies = 0
        while True:
            try:
                os.read(fd, 65536)
                replies += 1
            except BlockingIOError:
                break
        _emit(done=True, written=written, replies=replies)
    os.close(fd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.traffic")
    sub = parser.add_subparsers(dest="command", required=True)

    capture = sub.add_parser("capture")
    capture.add_argument("--interface", required=True)
    capture.add_argument("--filter", default="")
    capture.add_argument("--swap", action="append", default=[],
                         help="filters to alternate with --filter every --swap-interval")
    capture.add_argument("--swap-interval", type=float, default=0.05)
    capture.add_argument("--out", required=True)
    capture.add_argument("--timeout", type=float, default=40.0)
    capture.add_argument("--drain", type=float, default=0.4,
                         help="seconds to keep reading after stop: the block timeout, twice")
    capture.add_argument("--stats-interval", type=float, default=0.1)
    capture.add_argument("--block-size", type=int, default=1 << 20)
    capture.add_argument("--block-count", type=int, default=8)
    capture.add_argument("--block-timeout-ms", type=int, default=100)
    capture.set_defaults(func=cmd_capture)

    udp = sub.add_parser("udp")
    udp.add_argument("--dst", required=True)
    udp.add_argument("--src", default="", help="source address to bind")
    udp.add_argument("--ports", default="9999", help="comma-separated; cycled per datagram")
    udp.add_argument("--sizes", default="100", help="payload sizes, e.g. 1-1472,4000")
    udp.add_argument("--count", type=int, default=0, help="datagrams (default: sizes x ports)")
    udp.add_argument("--seq", action="store_true", help="number the datagrams")
    udp.add_argument("--pace", type=int, default=20, help="sleep 1 ms after this many")
    udp.add_argument("--rate", type=float, default=0.0,
                     help="datagrams per second, kept on a schedule (instead of --pace)")
    udp.set_defaults(func=cmd_udp)

    ether = sub.add_parser("ether")
    ether.add_argument("--interface", required=True)
    ether.add_argument("--dst-mac", required=True)
    ether.add_argument("--tags", default="", help="outer first: 0x88a8:200,0x8100:100")
    ether.add_argument("--src", default="192.0.2.1")
    ether.add_argument("--dst", default="192.0.2.2")
    ether.add_argument("--sizes", default="100")
    ether.add_argument("--count", type=int, default=0)
    ether.set_defaults(func=cmd_ether)

    sink = sub.add_parser("tcp-sink")
    sink.add_argument("--bind", default="0.0.0.0")
    sink.add_argument("--port", type=int, default=5201)
    sink.add_argument("--timeout", type=float, default=20.0)
    sink.set_defaults(func=cmd_tcp_sink)

    send = sub.add_parser("tcp-send")
    send.add_argument("--dst", required=True)
    send.add_argument("--port", type=int, default=5201)
    send.add_argument("--bytes", type=int, default=4 << 20)
    send.add_argument("--timeout", type=float, default=20.0)
    send.set_defaults(func=cmd_tcp_send)

    tun = sub.add_parser("tun")
    tun.add_argument("--name", required=True)
    tun.add_argument("--count", type=int, default=300)
    tun.set_defaults(func=cmd_tun)

    args = parser.parse_args(argv)
    return args.func(args)


# -------------------------------------------------------------------------------------------
# Test-side wrappers (run in the test process)
# -------------------------------------------------------------------------------------------


def helper_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.helpers.traffic", *args]


def _read_json_line(proc: subprocess.Popen, timeout: float, what: str) -> dict[str, Any]:
    """The next JSON line a helper prints, or an AssertionError with its stderr.

    select() sees only what the text wrapper has not buffered yet; that is enough because every
    helper waits (for a connection or for stdin) after each line it prints but the last.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"{what}: no answer within {timeout} s (exit {proc.returncode}): {err}")


def run_helper(ns: Any, *args: str) -> dict[str, Any]:
    """Run a helper command to completion in ``ns`` (at most 60 s); its last JSON line."""
    proc = ns.exec(*helper_command(*args), cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{args[0]} printed nothing: {proc.stderr}"
    return json.loads(lines[-1])


class Helper:
    """A helper that waits (tcp-sink, tun, capture): started, ready, then told or waited on."""

    def __init__(self, ns: Any, *args: str, ready_timeout: float = 20.0) -> None:
        self.name = args[0]
        self.proc = ns.popen(*helper_command(*args), cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ready = _read_json_line(self.proc, ready_timeout, f"{self.name} start")

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        return _read_json_line(self.proc, timeout, f"{self.name} result")

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the next JSON line, then close stdin and wait for the exit."""
        result = self.result(timeout)
        self.close()
        return result

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()


class CaptureProcess(Helper):
    """``traffic capture``: the afpacket backend writing pcapng inside a namespace."""

    def __init__(self, ns: Any, interface: str, out: Path, *options: str) -> None:
        super().__init__(ns, "capture", "--interface", interface, "--out", str(out), *options,
                         ready_timeout=30.0)

    def stop(self, timeout: float = 20.0) -> dict[str, Any]:
        self.tell("stop")
        return self.finish(timeout)


class Tcpdump:
    """tcpdump writing a reference pcap; ready once it says it is listening."""

    def __init__(self, ns: Any, interface: str, out: Path, expression: str = "",
                 buffer_kib: int = 131072) -> None:
        command = ["tcpdump", "-Z", "root", "-B", str(buffer_kib), "-s", "262144", "-w",
                   str(out), "-i", interface]
        if expression:
            command.append(expression)
        self.proc = ns.popen(*command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 15
        self.banner = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.banner += line
            if "listening on" in line:
                return
        self.proc.kill()
        raise AssertionError(f"tcpdump did not start: {self.banner}{self.proc.stderr.read()}")

    def stop(self) -> dict[str, int]:
        """SIGINT, then its counters (received, dropped by kernel)."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=15)
        counters = {}
        for line in err.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0].isdigit():
                counters[" ".join(words[1:])] = int(words[0])
        return {"captured": counters.get("packets captured", -1),
                "dropped": counters.get("packets dropped by kernel", -1)}

    def __enter__(self) -> Tcpdump:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


if __name__ == "__main__":
    sys.exit(main())
