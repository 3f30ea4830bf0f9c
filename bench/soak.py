"""``make soak``: months on a node, compressed into an hour: does memory stay flat?

The two-node cluster of ``tests/helpers/cluster.py``: node A runs the sensor exactly as the
DaemonSet does (``tests/helpers/daemonset.py``: every interface captured, the single-copy rules,
Antigena on, HTTPS to the reference vSensor on the bridge, trusted through a throwaway CA); node B
sends numbered UDP datagrams to node A's pod at a steady rate, so every datagram crosses node A's
uplink and the pod's veth and the rules keep one of the two copies. Meanwhile, each on its own
clock:

- a pod comes to node A (a Calico-style veth, ``cluster.pod``) or goes again (``--churn``);
- the vSensor stops (SIGTERM, every other time SIGKILL), stays away ``--down`` seconds and
  starts again on the same data folder (``--restart``); with ``--restart 0 --cut N`` its
  address is taken off the bridge for ``--down`` seconds instead, so that one vSensor process
  lives through the whole run;
- an Antigena action with a short expiry is issued through the operator CLI (``--antigena``),
  between addresses that carry no traffic: the sensor opens and closes its watch socket.

Every ``--sample`` seconds the sensor's and the vSensor's resident memory outside capture
rings (``bench.testbed.memory_kib``: a ring is mapped socket memory of a fixed size per
interface), descriptors, threads and the sensor's spool are recorded. At the end the traffic
stops, the churn settles (no pod, no action, vSensor up, spool empty) and the descriptors and
threads are compared with those of the same quiet state at the start; every datagram sent must
be in the vSensor's pcapng files exactly once. ``bench/soak_report.py`` fits the slopes after the
warm-up and writes the table, the JSON and the PNG.

    python -m bench.soak [--minutes 60] [--heap] [--json FILE] [--png FILE] (root)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.soak_report import (
    count_numbered,
    heap_diff,
    report,
    vsensor_heap_diff,
    write_outputs,
)
from bench.testbed import REPO, memory_kib
from tests.helpers.cli import TEST_KEY
from tests.helpers.cluster import VSENSOR_ADDRESS, VSENSOR_PORT, Node, VSensor, nodes, pod
from tests.helpers.daemonset import DaemonSetSensor, issue_certificate
from tests.helpers.traffic import helper_command

ADMIN_TOKEN = "soak-only-admin-token-51c2"  # a throwaway token for namespaces that die with the run
PORT = 7401


@dataclass(frozen=True)
class Plan:
    """What a soak run does; every period in seconds, 0 switches that churn off."""

    minutes: float = 60.0
    rate: int = 5000
    warmup_minutes: float | None = None  # None: 15, or a quarter of a shorter run
    sample: float = 10.0
    churn: float = 10.0
    restart: float = 150.0
    cut: float = 0.0
    down: float = 5.0
    antigena: float = 30.0
    antigena_duration: float = 12.0
    heap: bool = False

    @property
    def warmup(self) -> float:
        """Seconds of the run left out of the slopes."""
        if self.warmup_minutes is not None:
            return self.warmup_minutes * 60
        return min(15 * 60, self.minutes * 60 / 4)


def process_sample(pid: int) -> dict[str, Any]:
    """RSS outside and inside capture rings (MiB), descriptors and threads of ``pid``."""
    rss, ring = memory_kib(pid)
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        fds = threads = -1
    return {"pid": pid, "rss_mib": round((rss - ring) / 1024, 2),
            "ring_mib": round(ring / 1024, 2), "fds": fds, "threads": threads}


def folder_size(folder: Path, pattern: str) -> tuple[int, float]:
    """(files, MiB) matching ``pattern`` in ``folder``."""
    files = [p for p in folder.glob(pattern) if p.is_file()]
    return len(files), round(sum(p.stat().st_size for p in files) / 2**20, 2)


class Soak:
    """One run: the cluster, the processes, the churn clocks and the samples."""

    def __init__(self, plan: Plan, node: Node, net: Any, sender_ns: Any, workdir: Path) -> None:
        self.plan, self.node, self.net, self.sender_ns = plan, node, net, sender_ns
        self.workdir = workdir
        self.stack = ExitStack()
        self.code_env = {"PYTHONPATH": ":".join(filter(None, [os.environ.get("PYTHONPATH"),
                                                              str(REPO)]))}
        self.ca, self.cert, self.key = issue_certificate(workdir)
        self.vsensor = self._start_vsensor()
        heap = {"OSSENSOR_TRACEMALLOC": str(workdir / "heap")} if plan.heap else {}
        self.sensor = DaemonSetSensor(node, workdir, self.ca, {**self.code_env, **heap})
        self.samples: list[dict[str, Any]] = []
        self.events: dict[str, int] = {"pods": 0, "restarts": 0, "kills": 0, "cuts": 0,
                                       "actions": 0, "actions_refused": 0}
        self.pod: ExitStack | None = None
        self.vsensor_started = time.monotonic()
        self.action_until = 0.0
        self.started = time.monotonic()

    # -- the processes --------------------------------------------------------------------

    def _start_vsensor(self) -> VSensor:
        heap = ({"OSSENSOR_TRACEMALLOC": str(self.workdir / "heap-vsensor")} if self.plan.heap
                else {})
        return VSensor(self.net, self.workdir / "vsensor", TEST_KEY,
                       options=["--tls-cert", str(self.cert), "--tls-key", str(self.key)],
                       env={**self.code_env, "VSENSOR_ADMIN_TOKEN": ADMIN_TOKEN, **heap})

    def vsensor_heap_snapshot(self) -> None:
        """With ``--heap``: the vSensor's heap just before it is stopped, so that every
        process is seen at the same age (``--restart`` seconds) and a late one can be compared
        with an early one (``soak_report.vsensor_heap_diff``)."""
        if not self.plan.heap:
            return
        folder = self.workdir / "heap-vsensor"
        before = set(folder.glob("*.tracemalloc"))
        os.kill(self.vsensor.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not set(folder.glob("*.tracemalloc")) - before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the dump is written whole before the process is stopped
        for path in set(folder.glob("*.tracemalloc")) - before:
            path.rename(folder / f"at-{time.monotonic() - self.started:08.0f}s.tracemalloc")

    def registrations(self) -> int:
        return self.sensor.log.read_text(errors="replace").count("registered with the vSensor")

    def wait_registered(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.registrations() < count:
            if time.monotonic() > deadline or self.sensor.proc.poll() is not None:
                raise RuntimeError(f"the sensor did not register {count} times:\n"
                                   f"{self.sensor.log.read_text()[-3000:]}")
            time.sleep(0.2)

    # -- churn ----------------------------------------------------------------------------

    def toggle_pod(self) -> None:
        """Add a pod to node A, or remove the one there (its veth goes with it)."""
        if self.pod is None:
            self.pod = ExitStack()
            self.pod.enter_context(pod(self.node, 3))
            self.events["pods"] += 1
        else:
            self.pod.close()
            self.pod = None

    def restart_vsensor(self) -> None:
        self.vsensor_heap_snapshot()
        kill = self.events["restarts"] % 2 == 1
        if kill:
            self.vsensor.proc.send_signal(signal.SIGKILL)
            self.vsensor.proc.wait(timeout=10)
            self.events["kills"] += 1
        else:
            self.vsensor.stop()
        self.events["restarts"] += 1
        time.sleep(self.plan.down)
        self.vsensor = self._start_vsensor()
        self.vsensor_started = time.monotonic()

    def cut_vsensor(self) -> None:
        """The vSensor's address off the bridge for ``down`` seconds: a partition, not a
        restart."""
        self.net.ip("addr", "del", f"{VSENSOR_ADDRESS}/24", "dev", "br0")
        try:
            time.sleep(self.plan.down)
        finally:
            self.net.ip("addr", "add", f"{VSENSOR_ADDRESS}/24", "dev", "br0")
        self.events["cuts"] += 1

    def issue_action(self) -> None:
        """Block TCP to node A's port 22 from an address that never sends: nothing is reset,
        but the sensor gets the action, watches, and forgets it when it expires."""
        number = self.events["actions"] + self.events["actions_refused"]
        done = self.net.exec(
            sys.executable, "-m", "ossensor_vsensor.cli", "antigena", "--url",
            f"https://{VSENSOR_ADDRESS}:{VSENSOR_PORT}", "--ca-file", str(self.ca), "block",
            "--src", f"203.0.113.{number % 250 + 1}", "--dst", self.node.address, "--dport", "22",
            "--duration", str(self.plan.antigena_duration), check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.code_env,
                 "VSENSOR_ADMIN_TOKEN": ADMIN_TOKEN})
        if done.returncode == 0:
            self.events["actions"] += 1
            self.action_until = time.monotonic() + self.plan.antigena_duration
        else:  # the vSensor was away
            self.events["actions_refused"] += 1

    # -- samples --------------------------------------------------------------------------

    def take_sample(self, phase: str) -> dict[str, Any]:
        now = time.monotonic()
        spool = folder_size(self.workdir / self.node.name / "spool", "*.chunk")
        row = {"t": round(now - self.started, 1), "phase": phase,
               "pod": self.pod is not None, "action": now < self.action_until,
               "sensor": process_sample(self.sensor.proc.pid),
               "vsensor": {**process_sample(self.vsensor.proc.pid),
                           "age": round(now - self.vsensor_started, 1)},
               "spool_chunks": spool[0], "spool_mib": spool[1]}
        self.samples.append(row)
        return row

    def heap_snapshot(self) -> None:
        if self.plan.heap:
            os.kill(self.sensor.proc.pid, signal.SIGUSR2)

    def settle(self, phase: str) -> dict[str, Any]:
        """No pod, no action in force, the vSensor up and this sensor registered with it, the
        spool empty: the quiet state whose descriptors and threads must not change."""
        if self.pod is not None:
            self.toggle_pod()
        time.sleep(max(0.0, self.action_until - time.monotonic()) + 2.0)
        self.wait_registered(1 + self.events["restarts"])
        deadline = time.monotonic() + 60
        while folder_size(self.workdir / self.node.name / "spool", "*.chunk")[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the spool did not drain within 60 s")
            time.sleep(0.5)
        time.sleep(3.0)  # ring blocks handed over, the last chunk delivered
        return self.take_sample(phase)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.sensor.wait_for_log("capturing on up0", timeout=30)
        self.wait_registered(1)
        total = int(plan.rate * plan.minutes * 60)
        sender = self.sender_ns.popen(
            *helper_command("udp", "--dst", self.node.pod_address, "--ports", str(PORT),
                            "--count", str(total), "--sizes", "120", "--seq",
                            "--rate", str(plan.rate)),
            cwd=REPO, env={**os.environ, **self.code_env}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.stack.callback(lambda: sender.poll() is None and sender.kill())
        time.sleep(min(10.0, plan.minutes * 6))  # the pool threads and buffers exist now
        start = self.settle("start")
        self.heap_snapshot()
        clocks = {name: time.monotonic() + period for name, period in
                  (("sample", plan.sample), ("churn", plan.churn), ("restart", plan.restart),
                   ("cut", plan.cut), ("antigena", plan.antigena)) if period > 0}
        actions = {"churn": self.toggle_pod, "restart": self.restart_vsensor,
                   "cut": self.cut_vsensor, "antigena": self.issue_action,
                   "sample": lambda: self.take_sample("run")}
        heap_at = self.started + plan.warmup
        while sender.poll() is None:
            name = min(clocks, key=clocks.__getitem__)
            time.sleep(max(0.0, min(clocks[name] - time.monotonic(), 1.0)))
            if time.monotonic() < clocks[name]:
                continue
            if name in ("restart", "cut") and self.pod is not None:
                self.toggle_pod()  # one churn at a time keeps the quiet state reachable
                clocks["churn"] = time.monotonic() + plan.churn
            actions[name]()
            clocks[name] += (plan.restart if name == "restart" else plan.cut if name == "cut"
                             else getattr(plan, name))
            if heap_at and time.monotonic() >= heap_at:
                self.heap_snapshot()
                heap_at = 0.0
        out, err = sender.communicate(timeout=60)
        if sender.returncode != 0:
            raise RuntimeError(f"the sender failed: {err[-2000:]}")
        end = self.settle("end")
        self.heap_snapshot()
        time.sleep(3.0 if plan.heap else 0.0)
        return {"sent": total, "start": start, "end": end}

    def stop(self) -> tuple[int, int]:
        """(sensor, vSensor) exit codes."""
        self.stack.close()
        if self.pod is not None:
            self.pod.close()
        code = self.sensor.terminate(timeout=30)[0]
        return code, self.vsensor.stop()


def run_soak(plan: Plan, workdir: Path) -> dict[str, Any]:
    """The whole run; everything it made is removed again, also when it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    with nodes(2) as (net, (a, b)):
        soak = Soak(plan, a, net, b.ns, workdir)
        try:
            outcome = soak.run()
        finally:
            codes = soak.stop()
    stored = count_numbered(sorted((workdir / "vsensor" / a.name).glob("*.pcapng")), PORT,
                            outcome["sent"])
    result = {"plan": asdict(plan), "warmup_seconds": plan.warmup, "events": soak.events,
              "exit_codes": {"sensor": codes[0], "vsensor": codes[1]},
              "samples": soak.samples, **outcome, **stored,
              "heap": heap_diff(sorted((workdir / "heap").glob("*.tracemalloc"))),
              "vsensor_heap": vsensor_heap_diff(sorted((workdir / "heap-vsensor").glob("at-*")),
                                                plan.warmup)}
    result.update(report(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Plan()
    parser.add_argument("--minutes", type=float, default=defaults.minutes)
    parser.add_argument("--rate", type=int, default=defaults.rate, help="datagrams per second")
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="left out of the slopes (default 15, or a quarter of the run)")
    for name in ("sample", "churn", "restart", "cut", "down", "antigena"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name),
                            metavar="SECONDS", help="period in seconds; 0: off")
    parser.add_argument("--antigena-duration", type=float, default=defaults.antigena_duration)
    parser.add_argument("--heap", action="store_true",
                        help="tracemalloc snapshots of the sensor and of each vSensor process, "
                        "compared at the end (CPU!)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "soak.json")
    parser.add_argument("--png", type=Path, default=REPO / "bench" / "results" / "soak.png")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    plan = Plan(args.minutes, args.rate, args.warmup_minutes, args.sample, args.churn,
                args.restart, args.cut, args.down, args.antigena, args.antigena_duration,
                args.heap)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    try:
        result = run_soak(plan, workdir)
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(write_outputs(result, args.json, args.png))
    return 0 if result["verdict"]["nothing_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
