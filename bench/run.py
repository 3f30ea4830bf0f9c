"""``make bench``: what capture costs the node, ossensor against tcpdump, in one run.

Every traffic pattern is sent once per capturer, one capturer after the other, on a fresh
capture each time: ``tcpdump -B 131072 -w FILE`` (the anchor), the sensor with the ``afpacket``
backend and the HTTPS transport to a local vSensor, the same with the ``file`` transport, and the
``scapy`` backend. Ratios are against tcpdump in the same run, because the machine is shared.

    python -m bench.run [--smoke] [--json FILE] [--packets N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.filters import filter_costs
from bench.testbed import (Capturer, SensorCapturer, TcpdumpCapturer, TestBed, Traffic, dump,
                           measure, test_bed)

RESULTS = Path(__file__).resolve().parent / "results"

#: Targets of the HTTPS path: CPU per packet, sensor / tcpdump.
RATIO_TARGETS = {"udp64": 1.5, "udp512": 1.0, "tcp": 1.0}
SCAPY_RATE = 20_000

#: Every field each trial reports (the smoke test checks them all).
TRIAL_FIELDS = (
    "capturer", "traffic", "kind", "frame_bytes", "rate_pps", "sent", "stored", "kernel_drops",
    "lost", "loss_percent", "cpu_seconds", "cpu_seconds_stat", "cpu_us_per_packet",
    "ratio_to_tcpdump", "helper_cpu_seconds", "peak_rss_mib", "peak_ring_rss_mib",
    "peak_rss_outside_ring_mib", "send_seconds", "idle_wait_seconds")


def plan(smoke: bool, unpaced: int, seconds: float, rates: list[int],
         tcp_bytes: int, tcp_rate: str) -> list[tuple[Traffic, list[str]]]:
    """(traffic, capturers) in the order they run; capturer keys are those of ``capturers``."""
    main = ["tcpdump", "afpacket/https", "afpacket/file"]
    if smoke:
        return [
            (Traffic("udp64@20kpps", "udp", 64, 3000, SCAPY_RATE), [*main, "scapy/https"]),
            (Traffic("udp512@max", "udp", 512, 3000), main),
            (Traffic("tcp@200M", "tcp", tcp_bytes=8 << 20, tcp_rate="200M"), main),
        ]
    steps: list[tuple[Traffic, list[str]]] = []
    for frame in (64, 512):
        steps.append((Traffic(f"udp{frame}@max", "udp", frame, unpaced), main))
        for rate in rates:
            extra = ["scapy/https"] if frame == 64 and rate == SCAPY_RATE else []
            steps.append((Traffic(f"udp{frame}@{rate // 1000}kpps", "udp", frame,
                                  int(rate * seconds), rate), [*main, *extra]))
    steps.append((Traffic(f"tcp@{tcp_rate}", "tcp", tcp_bytes=tcp_bytes, tcp_rate=tcp_rate), main))
    return steps


def capturers(bed: TestBed, workdir: Path) -> dict[str, Any]:
    return {
        "tcpdump": lambda: TcpdumpCapturer(bed, workdir),
        "afpacket/https": lambda: SensorCapturer(bed, workdir, "afpacket", "https"),
        "afpacket/file": lambda: SensorCapturer(bed, workdir, "afpacket", "file"),
        "scapy/https": lambda: SensorCapturer(bed, workdir, "scapy", "https"),
    }


def add_ratios(trials: list[dict[str, Any]]) -> None:
    anchors = {t["traffic"]: t["cpu_us_per_packet"] for t in trials if t["capturer"] == "tcpdump"}
    for trial in trials:
        anchor = anchors.get(trial["traffic"])
        mine = trial["cpu_us_per_packet"]
        trial["ratio_to_tcpdump"] = round(mine / anchor, 3) if anchor and mine is not None else None


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
        if trial["capturer"] == "ossensor scapy/https" and trial["rate_pps"] == SCAPY_RATE:
            found.append({"target": f"{trial['traffic']}: scapy backend loses nothing",
                          "measured": trial["lost"], "holds": trial["lost"] == 0})
    return found


def table(trials: list[dict[str, Any]]) -> str:
    head = (f"{'traffic':<16}{'capturer':<26}{'sent':>9}{'stored':>9}{'drops':>7}"
            f"{'cpu s':>8}{'us/pkt':>8}{'ratio':>7}{'vsensor s':>10}{'rss MiB':>9}{'ring':>6}")
    rows = [head, "-" * len(head)]
    for t in trials:
        ratio = "" if t["ratio_to_tcpdump"] is None else f"{t['ratio_to_tcpdump']:.2f}"
        vsensor = t["helper_cpu_seconds"].get("vsensor")
        rows.append(
            f"{t['traffic']:<16}{t['capturer']:<26}{t['sent']:>9}{t['stored']:>9}"
            f"{t['kernel_drops']:>7}{t['cpu_seconds']:>8.3f}{t['cpu_us_per_packet'] or 0:>8.3f}"
            f"{ratio:>7}{'' if vsensor is None else f'{vsensor:.3f}':>10}"
            f"{t['peak_rss_outside_ring_mib']:>9.1f}{t['peak_ring_rss_mib']:>6.0f}")
    return "\n".join(rows)


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
                        "(comma-separated names such as udp64@max,tcp@1G)")
    parser.add_argument("--capturers", default="", help="run only these capturers "
                        "(comma-separated: tcpdump,afpacket/https,afpacket/file,scapy/https)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    missing = [t for t in ("ip", "tcpdump", "trafgen", "iperf3") if shutil.which(t) is None]
    if missing:
        parser.error(f"missing tools: {', '.join(missing)} (run `make setup`)")
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
        with test_bed(workdir) as bed:
            makers = capturers(bed, workdir)
            for traffic, names in steps:
                for name in names:
                    trial_dir = workdir / f"{len(trials):02d}"
                    trial_dir.mkdir()
                    capturer: Capturer = makers[name]()
                    capturer.workdir = trial_dir
                    print(f"-- {traffic.name}: {capturer.name}", file=sys.stderr, flush=True)
                    trials.append(measure(bed, capturer, traffic))
                    if not args.keep:
                        shutil.rmtree(trial_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"working directory kept: {workdir}", file=sys.stderr)
    add_ratios(trials)
    checks = verdicts(trials)
    filters = filter_costs()
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "seconds": round(time.time() - started, 1), "smoke": args.smoke,
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
              "trials": trials, "targets": checks, "filters": filters}
    dump(report, out)
    print(table(trials))
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
