"""``make bench``: what capture costs the node, ossensor against tcpdump, in one run.

Every traffic pattern is sent once per capturer, one capturer after the other, on a fresh
capture each time. Two anchors: ``tcpdump -B 131072 -w FILE`` (capture only) and ``tcpdump -w - |
socat - OPENSSL:...`` (capture and ship over TLS, the sensor's job done with C tools,
``bench/anchors.py``). Beside them the sensor with the ``afpacket`` backend and the HTTPS
transport to a local vSensor, the same with the ``file`` transport, and the ``scapy`` backend.
The routed trials (``routed64@max``, ``routed512@max``, ``bench/routed.py``) send through a
node of the simulated cluster, where the sensor runs with the DaemonSet's own settings and sees
every packet on two interfaces, while the anchors capture the uplink alone. Every ratio is
against each anchor in the same run, because the machine is shared; with ``--rounds N`` the
whole sequence runs N times, each ratio is taken against the anchors of the same round, and the
targets are judged on the median (one noisy trial moves a single ratio by a factor of two on
this shared machine).

    python -m bench.run [--smoke] [--rounds N] [--json FILE] [--packets N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.anchors import TlsPipeCapturer
from bench.filters import filter_costs
from bench.routed import DaemonSetCapturer, routed_bed
from bench.testbed import (
    Capturer,
    SensorCapturer,
    TcpdumpCapturer,
    TestBed,
    Traffic,
    dump,
    measure,
    test_bed,
)

RESULTS = Path(__file__).resolve().parent / "results"

#: Targets of the HTTPS path: CPU per packet, sensor / tcpdump.
RATIO_TARGETS = {"udp64": 1.5, "udp512": 1.0, "tcp": 1.0}
#: Targets of the routed trial: CPU per packet, the DaemonSet's sensor / tcpdump|socat.
ROUTED_TARGETS = {64: 1.5, 512: 1.0}
ROUTED_RSS_MIB = 96
ANCHORS = {"tcpdump": "ratio_to_tcpdump", "tcpdump|socat": "ratio_to_socat"}
SCAPY_RATE = 20_000

#: Every field each trial reports (the smoke test checks them all).
TRIAL_FIELDS = (
    "capturer", "traffic", "kind", "frame_bytes", "rate_pps", "sent", "stored", "kernel_drops",
    "lost", "loss_percent", "cpu_seconds", "cpu_seconds_stat", "cpu_us_per_packet",
    "ratio_to_tcpdump", "ratio_to_socat", "helper_cpu_seconds", "peak_rss_mib", "peak_ring_rss_mib",
    "peak_rss_outside_ring_mib", "send_seconds", "idle_wait_seconds", "threads", "round")


def plan(smoke: bool, unpaced: int, seconds: float, rates: list[int],
         tcp_bytes: int, tcp_rate: str) -> list[tuple[Traffic, list[str]]]:
    """(traffic, capturers) in the order they run; capturer keys are those of ``capturers``."""
    main = ["tcpdump", "tcpdump|socat", "afpacket/https", "afpacket/file"]
    routed = ["tcpdump", "tcpdump|socat", "daemonset"]
    if smoke:
        return [
            (Traffic("udp64@20kpps", "udp", 64, 3000, SCAPY_RATE), [*main, "scapy/https"]),
            (Traffic("udp512@max", "udp", 512, 3000), main),
            (Traffic("tcp@200M", "tcp", tcp_bytes=8 << 20, tcp_rate="200M"), main),
            (Traffic("routed64@max", "routed", 64, 3000), routed),
        ]
    steps: list[tuple[Traffic, list[str]]] = []
    for frame in (64, 512):
        steps.append((Traffic(f"udp{frame}@max", "udp", frame, unpaced), main))
        for rate in rates:
            extra = ["scapy/https"] if frame == 64 and rate == SCAPY_RATE else []
            steps.append((Traffic(f"udp{frame}@{rate // 1000}kpps", "udp", frame,
                                  int(rate * seconds), rate), [*main, *extra]))
    steps.append((Traffic(f"tcp@{tcp_rate}", "tcp", tcp_bytes=tcp_bytes, tcp_rate=tcp_rate), main))
    for frame in (64, 512):
        steps.append((Traffic(f"routed{frame}@max", "routed", frame, unpaced), routed))
    return steps


def capturers(bed: TestBed, workdir: Path) -> dict[str, Any]:
    """The veth bed's capturers by key."""
    return {
        "tcpdump": lambda: TcpdumpCapturer(bed, workdir),
        "tcpdump|socat": lambda: TlsPipeCapturer(bed, workdir),
        "afpacket/https": lambda: SensorCapturer(bed, workdir, "afpacket", "https"),
        "afpacket/file": lambda: SensorCapturer(bed, workdir, "afpacket", "file"),
        "scapy/https": lambda: SensorCapturer(bed, workdir, "scapy", "https"),
    }


def routed_capturers(bed: Any, workdir: Path) -> dict[str, Any]:
    """The routed bed's capturers by key: the anchors on node A's uplink, the DaemonSet's
    sensor on every interface of node A."""
    return {
        "tcpdump": lambda: TcpdumpCapturer(bed, workdir),
        "tcpdump|socat": lambda: TlsPipeCapturer(bed, workdir),
        "daemonset": lambda: DaemonSetCapturer(bed, workdir),
    }


def add_ratios(trials: list[dict[str, Any]]) -> None:
    """Each trial's CPU per packet over each anchor's (``ratio_to_tcpdump``,
    ``ratio_to_socat``), on the same traffic in the same round."""
    for anchor_name, key in ANCHORS.items():
        anchors = {(t["traffic"], t["round"]): t["cpu_us_per_packet"] for t in trials
                   if t["capturer"] == anchor_name}
        for trial in trials:
            anchor = anchors.get((trial["traffic"], trial["round"]))
            mine = trial["cpu_us_per_packet"]
            trial[key] = round(mine / anchor, 3) if anchor and mine is not None else None


def merge_rounds(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per traffic and capturer: the median CPU and ratio over the rounds, the worst
    loss and memory (with one round, the trials themselves)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for trial in trials:
        groups.setdefault((trial["traffic"], trial["capturer"]), []).append(trial)
    merged = []
    for rounds in groups.values():
        # Counts from the round that lost the most, so that sent and stored belong together.
        row = dict(max(rounds, key=lambda t: (t["lost"], t["kernel_drops"])))
        for key in ("cpu_seconds", "cpu_us_per_packet", *ANCHORS.values()):
            values = [t[key] for t in rounds if t.get(key) is not None]
            row[key] = round(statistics.median(values), 4) if values else None
        for key in ("kernel_drops", "lost", "loss_percent", "peak_rss_outside_ring_mib",
                    "peak_ring_rss_mib", "peak_rss_mib", "stored_twice"):
            if key in row:
                row[key] = max(t[key] for t in rounds)
        row["vsensor_cpu_seconds"] = statistics.median(
            [t["helper_cpu_seconds"].get("vsensor", 0.0) for t in rounds])
        row["receiver_cpu_seconds"] = statistics.median(
            [sum(t["helper_cpu_seconds"].values()) for t in rounds])
        row["rounds"] = len(rounds)
        row["ratios"] = [t["ratio_to_tcpdump"] for t in rounds]
        row["ratios_to_socat"] = [t.get("ratio_to_socat") for t in rounds]
        merged.append(row)
    return merged


def verdicts(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure measured and whether it holds."""
    found = []
    for trial in trials:
        family = "tcp" if trial["kind"] == "tcp" else f"udp{trial['frame_bytes']}"
        if trial["capturer"] == "ossensor afpacket/https":
            target = RATIO_TARGETS.get(family)
            if target is not None and trial["ratio_to_tcpdump"] is not None:
                found.append({"target": f"{trial['traffic']}: CPU/packet vs tcpdump <= {target}",
                              "measured": trial["ratio_to_tcpdump"],
                              "holds": trial["ratio_to_tcpdump"] <= target})
            tcpdump = next((t for t in trials if t["capturer"] == "tcpdump"
                            and t["traffic"] == trial["traffic"]), None)
            if trial["rate_pps"] is None and trial["kind"] == "udp":
                found.append({"target": f"{trial['traffic']}: loss < 0.01 % unpaced",
                              "measured": trial["loss_percent"],
                              "holds": trial["loss_percent"] < 0.01})
            elif tcpdump is not None and tcpdump["lost"] == 0:
                found.append({"target": f"{trial['traffic']}: nothing lost (tcpdump lost nothing)",
                              "measured": trial["lost"], "holds": trial["lost"] == 0})
            found.append({"target": f"{trial['traffic']}: RSS outside the ring <= 96 MiB",
                          "measured": trial["peak_rss_outside_ring_mib"],
                          "holds": trial["peak_rss_outside_ring_mib"] <= 96})
        if trial["capturer"] == "ossensor daemonset":
            found += routed_verdicts(trial)
        if trial["capturer"] == "ossensor scapy/https" and trial["rate_pps"] == SCAPY_RATE:
            found.append({"target": f"{trial['traffic']}: scapy backend loses nothing",
                          "measured": trial["lost"], "holds": trial["lost"] == 0})
    return found


def routed_verdicts(trial: dict[str, Any]) -> list[dict[str, Any]]:
    """The routed trial's targets for the DaemonSet's sensor (issue 17)."""
    name = trial["traffic"]
    found = [{"target": f"{name}: every packet stored exactly once (lost, stored twice)",
              "measured": [trial["lost"], trial.get("stored_twice")],
              "holds": trial["lost"] == 0 and trial.get("stored_twice") == 0},
             {"target": f"{name}: RSS outside the rings <= {ROUTED_RSS_MIB} MiB",
              "measured": trial["peak_rss_outside_ring_mib"],
              "holds": trial["peak_rss_outside_ring_mib"] <= ROUTED_RSS_MIB}]
    target = ROUTED_TARGETS.get(trial["frame_bytes"])
    if target is not None and trial["ratio_to_socat"] is not None:
        found.append({"target": f"{name}: CPU/packet vs tcpdump|socat <= {target}",
                      "measured": trial["ratio_to_socat"],
                      "holds": trial["ratio_to_socat"] <= target})
    return found


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def table(trials: list[dict[str, Any]]) -> str:
    """One line per trial: counts, CPU, the ratios to both anchors, the receiver's CPU (the
    vSensor or the socat server, not counted in the ratios), memory."""
    head = (f"{'traffic':<16}{'capturer':<26}{'sent':>9}{'stored':>9}{'twice':>7}{'drops':>7}"
            f"{'cpu s':>8}{'us/pkt':>8}{'x tcpd':>7}{'x socat':>8}{'recv s':>8}"
            f"{'rss MiB':>9}{'ring':>6}")
    rows = [head, "-" * len(head)]
    for t in trials:
        receiver = t.get("receiver_cpu_seconds", sum(t["helper_cpu_seconds"].values()))
        twice = t.get("stored_twice")
        rows.append(
            f"{t['traffic']:<16}{t['capturer']:<26}{t['sent']:>9}{t['stored']:>9}"
            f"{'' if twice is None else twice:>7}"
            f"{t['kernel_drops']:>7}{t['cpu_seconds']:>8.3f}{t['cpu_us_per_packet'] or 0:>8.3f}"
            f"{_ratio(t['ratio_to_tcpdump']):>7}{_ratio(t.get('ratio_to_socat')):>8}"
            f"{receiver:>8.3f}"
            f"{t['peak_rss_outside_ring_mib']:>9.1f}{t['peak_ring_rss_mib']:>6.0f}")
    return "\n".join(rows)


def commit() -> str:
    """The checked-out commit of this tree (what the figures belong to)."""
    done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse",
                           "--short", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a few thousand packets per trial (what `make test` runs)")
    parser.add_argument("--json", type=Path, help="where to write the results "
                        "(default bench/results/latest.json, or smoke.json with --smoke)")
    parser.add_argument("--packets", type=int, default=1_000_000,
                        help="frames per unpaced UDP trial")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="length of each paced UDP trial (packets = rate x seconds)")
    parser.add_argument("--rates", default="20000,100000,200000",
                        help="paced UDP rates in packets per second, comma-separated")
    parser.add_argument("--tcp-bytes", type=int, default=512 << 20)
    parser.add_argument("--tcp-rate", default="1G", help="iperf3 -b for the TCP trial")
    parser.add_argument("--only", default="", help="run only these traffic patterns "
                        "(comma-separated names such as udp64@max,tcp@1G,routed512@max)")
    parser.add_argument("--capturers", default="", help="run only these capturers "
                        "(comma-separated: tcpdump,tcpdump|socat,afpacket/https,afpacket/file,"
                        "scapy/https,daemonset)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="run everything this many times; targets are judged on medians "
                        "(default 3, or 1 with --smoke)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    missing = [t for t in ("ip", "tcpdump", "trafgen", "iperf3", "socat", "tcpreplay")
               if shutil.which(t) is None]
    if missing:
        parser.error(f"missing tools: {', '.join(missing)} (run `make setup`)")
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    steps = plan(args.smoke, args.packets, args.seconds, rates, args.tcp_bytes, args.tcp_rate)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        steps = [(t, names) for t, names in steps if t.name in wanted]
    if args.capturers:
        chosen = {n.strip() for n in args.capturers.split(",")}
        steps = [(t, [n for n in names if n in chosen]) for t, names in steps]
    out = args.json or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    workdir = Path(tempfile.mkdtemp(prefix="ossensor-bench-"))
    trials: list[dict[str, Any]] = []
    started = time.time()
    try:
        with ExitStack() as stack:
            beds: dict[str, tuple[Any, dict[str, Any]]] = {}
            if any(t.kind != "routed" and names for t, names in steps):
                bed = stack.enter_context(test_bed(workdir))
                beds["veth"] = (bed, capturers(bed, workdir))
            if any(t.kind == "routed" and names for t, names in steps):
                routed = stack.enter_context(routed_bed(workdir))
                beds["routed"] = (routed, routed_capturers(routed, workdir))
            for number in range(1, args.rounds + 1):
                for traffic, names in steps:
                    where, makers = beds["routed" if traffic.kind == "routed" else "veth"] \
                        if names else (None, {})
                    for name in names:
                        trial_dir = workdir / f"{len(trials):02d}"
                        trial_dir.mkdir()
                        capturer: Capturer = makers[name]()
                        capturer.workdir = trial_dir
                        print(f"-- round {number}/{args.rounds} {traffic.name}: "
                              f"{capturer.name}", file=sys.stderr, flush=True)
                        trials.append({**measure(where, capturer, traffic), "round": number})
                        if not args.keep:
                            shutil.rmtree(trial_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"working directory kept: {workdir}", file=sys.stderr)
    add_ratios(trials)
    merged = merge_rounds(trials)
    checks = verdicts(merged)
    filters = filter_costs()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "seconds": round(time.time() - started, 1), "smoke": args.smoke,
              "rounds": args.rounds, "commit": commit(),
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
              "trials": trials, "medians": merged, "targets": checks, "filters": filters}
    dump(report, out)
    if args.rounds > 1:
        print(f"medians over {args.rounds} rounds (each ratio against tcpdump of its round):")
    print(table(merged))
    if args.rounds > 1:
        for row in merged:
            if row["capturer"] not in ANCHORS:
                print(f"  {row['traffic']:<14}{row['capturer']:<26}ratios by round: "
                      f"{', '.join(f'{r:.2f}' for r in row['ratios'] if r is not None)} (tcpdump)"
                      f"; {', '.join(f'{r:.2f}' for r in row['ratios_to_socat'] if r is not None)}"
                      " (tcpdump|socat)")
    print()
    for check in checks:
        print(f"{'ok  ' if check['holds'] else 'MISS'} {check['target']}: {check['measured']}")
    print("\nuser-space filters, per packet (pcapng writing as a yardstick):")
    for cost in filters:
        print(f"  {cost['filter']:<32}{cost['ns_per_packet']:>7} ns"
              f"   (pcapng writer {cost['pcapng_writer_ns_per_packet']} ns)")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
