"""The benchmark's test bed: two namespaces, a veth pair, traffic, capturers and their costs.

The sender namespace runs the traffic generators (trafgen for UDP, iperf3 for TCP); the capture
namespace holds the receiving end of the veth, the capturer under test and, for the HTTPS path, a
reference vSensor on its loopback. IPv6 is off and the neighbours are static, so that the wire
carries only the benchmark's own packets and "sent" is exact: UDP frames go to a MAC address that
nobody owns, so the receiving stack drops them silently (no ICMP answers) while a promiscuous
capture sees them all.

CPU is read from ``/proc``: the run time of every thread (``/proc/PID/task/*/schedstat``, in
nanoseconds) of the capturing process and its descendants, taken right before the traffic and
again when the capturer has gone idle after it, so start-up and shutdown do not count. The
``utime + stime`` of ``/proc/PID/stat`` (10 ms ticks) is kept beside it as a cross-check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.cli import clean_environment
from tests.helpers.netns import Namespace, namespaces, veth_pair

REPO = Path(__file__).resolve().parents[1]
SENSOR = [sys.executable, "-m", "ossensor_core.ops.cli", "run"]
VSENSOR = [sys.executable, "-m", "ossensor_vsensor.cli"]
BENCH_KEY = "bench-only-hmac-key-7f3a"  # a throwaway key for a namespace that dies with the run
NOBODY_MAC = "02:00:00:00:00:99"
TX_ADDR, RX_ADDR = "192.0.2.1", "192.0.2.2"
UDP_PORT, IPERF_PORT, VSENSOR_PORT = 9, 5201, 8443
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# -- traffic ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Traffic:
    """One traffic pattern: a fixed number of UDP frames, or a fixed TCP transfer."""

    name: str
    kind: str  # "udp", "tcp" or "routed" (bench/routed.py)
    frame: int = 64  # UDP: bytes per Ethernet frame (without FCS)
    packets: int = 0  # UDP: frames to send
    rate_pps: int | None = None  # UDP: None = as fast as trafgen goes
    tcp_bytes: int = 0
    tcp_rate: str = ""  # iperf3 -b

    @property
    def paced(self) -> bool:
        return self.rate_pps is not None or self.kind == "tcp"


def trafgen_config(frame: int, src_mac: str) -> str:
    """A trafgen packet: Ethernet to nobody, IPv4, UDP, random payload (drnd: new every frame)."""
    payload = frame - 14 - 20 - 8
    if payload < 1:
        raise ValueError(f"a {frame}-byte frame has no room for a UDP payload")
    return (f"{{ eth(da={NOBODY_MAC}, sa={src_mac}, type=0x0800), "
            f"ipv4(saddr={TX_ADDR}, daddr={RX_ADDR}, ttl=64), "
            f"udp(sp=4000, dp={UDP_PORT}), drnd({payload}) }}\n")


# -- process accounting -------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of ``pid`` and its descendants."""
    total = 0
    for proc in descendants(pid):
        for task in Path(f"/proc/{proc}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def read_stat(path: Path) -> tuple[str, list[str]] | None:
    """(name, fields after the name) of a ``/proc/.../stat`` file; None when it is gone. The
    name is in parentheses and may hold spaces, so the fields start after the last one."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """Thread id -> (name, utime, stime) in clock ticks, for every thread of ``pid``: where
    the capturer spends its time, and how much of it is in the kernel."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        if (stat := read_stat(task / "stat")) is not None:
            name, fields = stat
            threads[int(task.name)] = (name, int(fields[11]), int(fields[12]))
    return threads


def thread_split(before: dict[int, tuple[str, int, int]],
                 after: dict[int, tuple[str, int, int]]) -> list[dict[str, Any]]:
    """User and system seconds per thread between two ``thread_ticks``, busiest first."""
    rows = []
    for tid, (name, user, system) in after.items():
        _, user0, system0 = before.get(tid, (name, 0, 0))
        if user + system - user0 - system0:
            rows.append({"tid": tid, "name": name, "user": (user - user0) / CLOCK_TICK,
                         "system": (system - system0) / CLOCK_TICK})
    return sorted(rows, key=lambda r: -(r["user"] + r["system"]))


def cpu_ticks_seconds(pid: int) -> float:
    """utime + stime (+ children's) of ``pid`` and its descendants, from /proc/PID/stat."""
    total = 0
    for proc in descendants(pid):
        if (stat := read_stat(Path(f"/proc/{proc}/stat"))) is not None:
            total += sum(int(v) for v in stat[1][11:15])  # utime stime cutime cstime
    return total / CLOCK_TICK


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, RSS of capture rings) in KiB: a packet ring is a ``socket:[inode]`` mapping."""
    rss = ring = 0
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return 0, 0
    in_ring = False
    for line in lines:
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_ring = line.rstrip().endswith("]") and "socket:[" in line
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            rss += kib
            if in_ring:
                ring += kib
    return rss, ring


class MemorySampler:
    """Samples RSS outside and inside the rings of processes (summed) every ``period``
    seconds."""

    def __init__(self, pids: list[int], period: float = 0.2) -> None:
        self.pids = pids
        self.period = period
        self.peak_rss_kib = 0
        self.peak_ring_kib = 0
        self.peak_outside_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        found = [memory_kib(pid) for pid in self.pids]
        rss, ring = sum(r for r, _ in found), sum(r for _, r in found)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_ring_kib = max(self.peak_ring_kib, ring)
        self.peak_outside_kib = max(self.peak_outside_kib, rss - ring)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def wait_idle(pids: list[int], minimum: float, maximum: float = 120.0,
              quiet_ns: int = 15_000_000, period: float = 0.5) -> float:
    """Wait at least ``minimum`` seconds, then until every pid used less than ``quiet_ns`` of
    CPU over one ``period``; returns the seconds waited."""
    started = time.monotonic()
    time.sleep(minimum)
    last = [cpu_ns(p) for p in pids]
    while time.monotonic() - started < maximum:
        time.sleep(period)
        now = [cpu_ns(p) for p in pids]
        if all(b - a < quiet_ns for a, b in zip(last, now, strict=True)):
            break
        last = now
    return time.monotonic() - started


# -- reading what was stored --------------------------------------------------------------------

def pcap_frames(path: Path) -> Iterator[memoryview]:
    """The captured bytes of every record of a classic pcap file."""
    data = memoryview(path.read_bytes())
    if len(data) < 24:
        return
    endian = "<" if bytes(data[:4]) in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    record = struct.Struct(endian + "IIII")
    position = 24
    while position + 16 <= len(data):
        incl = record.unpack_from(data, position)[2]
        yield data[position + 16:position + 16 + incl]
        position += 16 + incl


def count_pcap(path: Path) -> int:
    """Records in a classic pcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return 0
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    record = struct.Struct(endian + "IIII")
    position, count = 24, 0
    while position + 16 <= len(data):
        incl = record.unpack_from(data, position)[2]
        position += 16 + incl
        count += 1
    return count


def pcapng_frames(paths: list[Path]) -> Iterator[memoryview]:
    """The captured bytes of every enhanced packet block in pcapng files (as the vSensor
    writes them: little-endian, one section per file), one file in memory at a time."""
    header = struct.Struct("<II")
    for path in paths:
        data = memoryview(path.read_bytes())
        position = 0
        while position + 8 <= len(data):
            kind, length = header.unpack_from(data, position)
            if length < 12:
                raise ValueError(f"{path}: corrupt block at {position}")
            if kind == 6:
                captured = header.unpack_from(data, position + 20)[0]
                yield data[position + 28:position + 28 + captured]
            position += length


def count_pcapng(paths: list[Path]) -> int:
    """Enhanced and simple packet blocks in pcapng files."""
    count = 0
    header = struct.Struct("<II")
    for path in paths:
        data = path.read_bytes()
        position = 0
        while position + 8 <= len(data):
            kind, length = header.unpack_from(data, position)
            if length < 12:
                raise ValueError(f"{path}: corrupt block at {position}")
            count += kind in (3, 6)
            position += length
    return count


# -- capturers ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a capturer reports when stopped."""

    stored: int
    kernel_drops: int
    notes: dict[str, Any] = field(default_factory=dict)


class Capturer:
    """A process that captures on the receiving interface; started per trial."""

    name = "capturer"
    #: A sensor (a Python process) that ``BENCH_PROFILE`` samples with py-spy.
    profiled = False

    def __init__(self, bed: TestBed, workdir: Path) -> None:
        self.bed = bed
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_pids(self) -> list[int]:
        """The capturing processes, whose CPU (with their descendants') is the trial's
        figure, and whose memory is summed."""
        return [self.pid]

    def helper_pids(self) -> dict[str, int]:
        """Other processes whose CPU is reported separately (the vSensor)."""
        return {}

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Outcome:
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class TcpdumpCapturer(Capturer):
    """``tcpdump -B 131072 -w FILE``: the anchor."""

    name = "tcpdump"

    def start(self) -> None:
        self.out = self.workdir / "tcpdump.pcap"
        self.err = self.workdir / "tcpdump.err"
        self.proc = self.bed.rx.popen(
            "tcpdump", "-Z", "root", "-B", "131072", "-s", "262144", "-n", "-i", self.bed.rx_if,
            "-w", str(self.out), stdout=subprocess.DEVNULL, stderr=open(self.err, "w"))
        wait_for(lambda: "listening on" in self.err.read_text(), 15, self.proc, self.err)

    def stop(self) -> Outcome:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        text = self.err.read_text()
        match = re.search(r"(\d+) packets dropped by kernel", text)
        stored, notes = self.bed.stored_pcap(self.out)
        return Outcome(stored, int(match.group(1)) if match else -1, notes)


class SensorCapturer(Capturer):
    """``ossensor run`` with a backend and a transport; the HTTPS transport talks to a vSensor
    on the capture namespace's loopback, started for this trial."""

    profiled = True

    def __init__(self, bed: TestBed, workdir: Path, backend: str, transport: str,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(bed, workdir)
        self.backend = backend
        self.transport = transport
        self.extra_env = extra_env or {}
        self.name = f"ossensor {backend}/{transport}"
        self.vsensor: subprocess.Popen | None = None

    def helper_pids(self) -> dict[str, int]:
        return {"vsensor": self.vsensor.pid} if self.vsensor is not None else {}

    def _start_vsensor(self) -> str:
        data = self.workdir / "vsensor"
        log = self.workdir / "vsensor.log"
        self.vsensor = self.bed.rx.popen(
            *VSENSOR, "--listen", f"127.0.0.1:{VSENSOR_PORT}", "--data-dir", str(data),
            "--heartbeat-seconds", "2", "--rotate-seconds", "3600",
            env=clean_environment(VSENSOR_HMAC_KEY=BENCH_KEY), stdout=subprocess.DEVNULL,
            stderr=open(log, "w"))
        pattern = re.compile(r"fingerprint: ([0-9A-Fa-f:]+)")
        wait_for(lambda: pattern.search(log.read_text()) is not None, 30, self.vsensor, log)
        match = pattern.search(log.read_text())
        assert match is not None
        return match.group(1)

    def start(self) -> None:
        self.log = self.workdir / "sensor.log"
        env = clean_environment(
            OSSENSOR_NAME="bench", OSSENSOR_CAPTURE_BACKEND=self.backend,
            OSSENSOR_TRANSPORT=self.transport, NETWORK_DEVICE_INCLUDE=self.bed.rx_if,
            VSENSOR_HOSTNAME="127.0.0.1", VSENSOR_PORT=str(VSENSOR_PORT),
            VSENSOR_HMAC_KEY=BENCH_KEY, OSSENSOR_DEBUG=os.environ.get("BENCH_SENSOR_DEBUG", "1"),
            OSSENSOR_CONFIG_PATH=str(self.workdir / "ossensor.cfg"),
            OSSENSOR_LOGFILE_PATH=str(self.log), OSSENSOR_OUTPUT_DIR=str(self.workdir / "out"),
            OSSENSOR_SPOOL_DIR=str(self.workdir / "spool"), PYTHONPATH=str(REPO))
        if self.transport == "https":
            env["VSENSOR_TLS_FINGERPRINT"] = self._start_vsensor()
        env.update(self.extra_env)
        self.proc = self.bed.rx.popen(*SENSOR, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT)
        ready = "kernel filter is now" if self.transport == "https" else "sensor .* running"
        wait_for(lambda: re.search(ready, read(self.log)) is not None, 30, self.proc, self.log)

    def stop(self) -> Outcome:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        text = read(self.log)
        drops = [int(m) for m in re.findall(
            rf"capture {re.escape(self.bed.rx_if)}: \d+ packets, (\d+) kernel drops", text)]
        notes: dict[str, Any] = {"exit_code": code}
        if self.transport == "https":
            assert self.vsensor is not None
            self.vsensor.send_signal(signal.SIGTERM)
            notes["vsensor_exit_code"] = self.vsensor.wait(timeout=60)
            files = sorted((self.workdir / "vsensor" / "bench").glob("*.pcapng"))
        else:
            files = sorted((self.workdir / "out").rglob("*.pcapng"))
        spooled = list((self.workdir / "spool").glob("*.chunk")) if self.transport == "https" \
            else []
        notes["spooled_chunks_left"] = len(spooled)
        stored, counted = self.bed.stored_pcapng(files)
        return Outcome(stored, drops[-1] if drops else -1, {**notes, **counted})

    def kill(self) -> None:
        super().kill()
        if self.vsensor is not None and self.vsensor.poll() is None:
            self.vsensor.kill()
            self.vsensor.wait(timeout=10)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition: Callable[[], bool], timeout: float, proc: subprocess.Popen,
             log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{read(log)[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} not ready after {timeout} s:\n{read(log)[-3000:]}")
        time.sleep(0.1)


# -- the bed ------------------------------------------------------------------------------------

class TestBed:
    """Two namespaces joined by a veth pair, IPv6 off, static neighbours."""

    __test__ = False  # not a pytest class

    def __init__(self, tx: Namespace, rx: Namespace, tx_if: str, rx_if: str,
                 workdir: Path) -> None:
        self.tx, self.rx, self.tx_if, self.rx_if = tx, rx, tx_if, rx_if
        self.workdir = workdir
        self.tx_mac = tx.exec("cat", f"/sys/class/net/{tx_if}/address").stdout.strip()
        self.rx_mac = rx.exec("cat", f"/sys/class/net/{rx_if}/address").stdout.strip()
        tx.ip("neigh", "replace", RX_ADDR, "lladdr", self.rx_mac, "nud", "permanent", "dev", tx_if)
        rx.ip("neigh", "replace", TX_ADDR, "lladdr", self.tx_mac, "nud", "permanent", "dev", rx_if)

    def stored_pcap(self, path: Path) -> tuple[int, dict[str, Any]]:
        """(packets stored, notes) of a classic pcap file: here every record counts."""
        return count_pcap(path), {}

    def stored_pcapng(self, paths: list[Path]) -> tuple[int, dict[str, Any]]:
        return count_pcapng(paths), {}

    def rx_counters(self) -> tuple[int, int]:
        """(received, sent) packets of the capture interface."""
        text = self.rx.exec("cat", f"/sys/class/net/{self.rx_if}/statistics/rx_packets",
                            f"/sys/class/net/{self.rx_if}/statistics/tx_packets").stdout.split()
        return int(text[0]), int(text[1])

    def send(self, traffic: Traffic) -> dict[str, Any]:
        """Send ``traffic`` from the sender namespace; returns what was put on the wire."""
        before = self.rx_counters()
        started = time.monotonic()
        if traffic.kind == "udp":
            config = self.workdir / f"trafgen-{traffic.frame}.cfg"
            config.write_text(trafgen_config(traffic.frame, self.tx_mac))
            command = ["trafgen", "-o", self.tx_if, "-i", str(config), "-n",
                       str(traffic.packets), "-P", "1", "-Q", "-q"]
            if traffic.rate_pps:
                command += ["-b", f"{traffic.rate_pps}pps"]
            timeout = 60 + (traffic.packets / traffic.rate_pps if traffic.rate_pps else 60)
            subprocess.run([*self.tx.prefix(), *command], check=True, capture_output=True,
                           timeout=timeout)
        else:
            command = ["iperf3", "-c", RX_ADDR, "-p", str(IPERF_PORT), "-n",
                       str(traffic.tcp_bytes), "-J"]
            if traffic.tcp_rate:
                command += ["-b", traffic.tcp_rate]
            subprocess.run([*self.tx.prefix(), *command], check=True, capture_output=True,
                           timeout=120)
        seconds = time.monotonic() - started
        after = self.rx_counters()
        on_wire = (after[0] - before[0]) + (after[1] - before[1])
        return {"on_wire": on_wire, "send_seconds": round(seconds, 3)}


@contextmanager
def test_bed(workdir: Path | None = None) -> Iterator[TestBed]:
    """Create the bed (and an iperf3 server in the capture namespace); remove it all after."""
    own = workdir is None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="ossensor-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with namespaces(2) as (tx, rx):
        for ns in (tx, rx):
            for key in ("all", "default"):
                ns.exec("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        with veth_pair(tx, rx, "btx0", "brx0", f"{TX_ADDR}/24", f"{RX_ADDR}/24") as (t, r):
            bed = TestBed(tx, rx, t, r, workdir)
            iperf = None
            if shutil.which("iperf3"):
                iperf = rx.popen("iperf3", "-s", "-B", RX_ADDR, "-p", str(IPERF_PORT),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                yield bed
            finally:
                if iperf is not None:
                    iperf.kill()
                    iperf.wait(timeout=10)
    if own:
        shutil.rmtree(workdir, ignore_errors=True)


def _profiler(capturer: Capturer, traffic: Traffic) -> subprocess.Popen | None:
    """With BENCH_PROFILE=DIR, py-spy samples the sensor during the traffic (collapsed stacks
    in DIR, one file per trial): to find where the CPU goes, not for the figures."""
    folder = os.environ.get("BENCH_PROFILE")
    if not folder or not capturer.profiled or not shutil.which("py-spy"):
        return None
    name = f"{traffic.name}-{capturer.name.split()[-1].replace('/', '-')}.txt"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "-p", str(capturer.pid), "-r", "250", "-t",
                             *os.environ.get("BENCH_PROFILE_ARGS", "--nonblocking").split(),
                             "-f", "raw", "-o", str(Path(folder) / name)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(bed: TestBed, capturer: Capturer, traffic: Traffic) -> dict[str, Any]:
    """One trial: start the capturer, send, wait until it is idle, stop it, count."""
    capturer.start()
    try:
        helpers = capturer.helper_pids()
        pids = capturer.cpu_pids()
        # Start-up is not part of the figures: let it finish (the sensor registers, imports
        # what Antigena crafts resets with, ...) before the traffic window opens.
        wait_idle([*pids, *helpers.values()], minimum=0.5, maximum=30)
        memory = MemorySampler(pids)
        cpu0, ticks0 = sum(map(cpu_ns, pids)), sum(map(cpu_ticks_seconds, pids))
        threads0 = {k: v for pid in pids for k, v in thread_ticks(pid).items()}
        helper0 = {k: cpu_ns(p) for k, p in helpers.items()}
        profiler = _profiler(capturer, traffic)
        sent = bed.send(traffic)
        waited = wait_idle([*pids, *helpers.values()], minimum=1.5)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=30)
        cpu1, ticks1 = sum(map(cpu_ns, pids)), sum(map(cpu_ticks_seconds, pids))
        threads = thread_split(threads0, {k: v for pid in pids
                                          for k, v in thread_ticks(pid).items()})
        helper1 = {k: cpu_ns(p) for k, p in helpers.items()}
        memory.stop()
        outcome = capturer.stop()
    finally:
        capturer.kill()
    packets = sent.pop("on_wire")
    cpu = (cpu1 - cpu0) / 1e9
    result = {**sent,
        "capturer": capturer.name, "traffic": traffic.name, "kind": traffic.kind,
        "frame_bytes": traffic.frame if traffic.kind != "tcp" else None,
        "rate_pps": traffic.rate_pps, "sent": packets, "stored": outcome.stored,
        "kernel_drops": outcome.kernel_drops, "lost": packets - outcome.stored,
        "loss_percent": round(100 * (packets - outcome.stored) / packets, 4) if packets else 0.0,
        "cpu_seconds": round(cpu, 4), "cpu_seconds_stat": round(ticks1 - ticks0, 3),
        "cpu_us_per_packet": round(1e6 * cpu / packets, 4) if packets else None,
        "helper_cpu_seconds": {k: round((helper1[k] - helper0[k]) / 1e9, 4) for k in helpers},
        "peak_rss_mib": round(memory.peak_rss_kib / 1024, 1),
        "peak_ring_rss_mib": round(memory.peak_ring_kib / 1024, 1),
        "peak_rss_outside_ring_mib": round(memory.peak_outside_kib / 1024, 1),
        "idle_wait_seconds": round(waited, 2),
        "threads": threads,
    }
    result.update(outcome.notes)
    return result


def dump(results: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
