"""What a soak run found: datagrams stored, slopes after the warm-up, a table, a JSON and a PNG.

The slope is a least-squares line through resident memory outside the capture rings, in MiB per
hour, over the samples after the warm-up. A restarted vSensor is a new process, so in a run
with restarts its slope goes through the last sample of each of its processes (each the same
age): what it shows is growth that outlives a restart (state read back from the data folder),
not growth within one process; ``--restart 0 --cut N`` keeps one vSensor process for that.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.testbed import pcapng_frames

#: The issue's target: MiB per hour after the warm-up, over two hours.
TARGET_MIB_PER_HOUR = 1.0
TARGET_FIT_HOURS = 2.0
_SEQ_MAGIC = b"OSSQ"


def count_numbered(paths: list[Path], port: int, sent: int) -> dict[str, Any]:
    """How often each numbered datagram (``traffic udp --seq``, IPv4) to ``port`` was stored
    in the pcapng files ``paths``."""
    return count_numbered_frames(pcapng_frames(paths), port, sent)


def count_numbered_frames(frames: Iterable[memoryview | bytes], port: int,
                          sent: int) -> dict[str, Any]:
    """How often each of ``sent`` numbered datagrams (``OSSQ`` and a big-endian u32 after the
    UDP header, IPv4) to ``port`` appears among Ethernet ``frames``."""
    seen = bytearray(sent)
    other = 0
    for frame in frames:
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        udp = 14 + (frame[14] & 0x0F) * 4
        if len(frame) < udp + 16 or frame[udp + 8:udp + 12] != _SEQ_MAGIC or \
                struct.unpack_from("!H", frame, udp + 2)[0] != port:
            continue
        number = struct.unpack_from("!I", frame, udp + 12)[0]
        if number < sent:
            seen[number] = min(255, seen[number] + 1)
        else:
            other += 1
    missing = seen.count(0)
    once = seen.count(1)
    first = seen.find(0)
    return {"stored_once": once, "missing": missing, "stored_twice_or_more": sent - once - missing,
            "first_missing": first if first >= 0 else None, "unexpected_numbers": other}


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) in MiB per hour; None below three points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread:
        return None
    return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def vsensor_points(samples: list[dict[str, Any]], restarted: bool) -> list[tuple[float, float]]:
    """The vSensor's (t, RSS) to fit: every sample of one process, or the last sample of each
    process but the current one when it was restarted."""
    if not restarted:
        return [(s["t"], s["vsensor"]["rss_mib"]) for s in samples]
    last: dict[int, dict[str, Any]] = {}
    for sample in samples:
        last[sample["vsensor"]["pid"]] = sample
    ended = list(last.values())[:-1]
    return [(s["t"], s["vsensor"]["rss_mib"]) for s in ended]


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Slopes, ranges and verdicts of a finished run (added to its result)."""
    warmup = result["warmup_seconds"]
    run = [s for s in result["samples"] if s["phase"] == "run"]
    after = [s for s in run if s["t"] >= warmup]
    restarted = result["events"]["restarts"] > 0
    fit_hours = (after[-1]["t"] - after[0]["t"]) / 3600 if len(after) > 1 else 0.0
    slopes = {"sensor": slope([(s["t"], s["sensor"]["rss_mib"]) for s in after]),
              "sensor_without_pod": slope([(s["t"], s["sensor"]["rss_mib"]) for s in after
                                           if not s["pod"]]),
              "vsensor": slope(vsensor_points(after, restarted))}
    ranges = {}
    for who in ("sensor", "vsensor"):
        for field in ("rss_mib", "fds", "threads"):
            values = [s[who][field] for s in after]
            ranges[f"{who}_{field}"] = [min(values), max(values)] if values else None
    start, end = result["start"], result["end"]
    back = {who: {f: [start[who][f], end[who][f]] for f in ("fds", "threads")}
            for who in ("sensor", "vsensor")}
    lost = result["missing"] + result["stored_twice_or_more"]
    verdict = {
        "nothing_lost": lost == 0 and result["stored_once"] == result["sent"],
        "sensor_fds_threads_back": all(a == b for a, b in back["sensor"].values()),
        # A restarted vSensor is another process: only one that lived through it compares.
        "vsensor_fds_threads_back": None if restarted else
        all(a == b for a, b in back["vsensor"].values()),
        "slopes_under_target": all(v is not None and v < TARGET_MIB_PER_HOUR
                                   for k, v in slopes.items() if k != "sensor_without_pod"),
        "fit_hours": round(fit_hours, 2),
        # The samples cover two hours when the last is within one sampling period of them:
        # the 8,100 s of a 135-minute run hold 7,190 s from the first to the last sample.
        "target_shown": fit_hours + result["plan"]["sample"] / 3600 >= TARGET_FIT_HOURS,
    }
    return {"slopes_mib_per_hour": {k: None if v is None else round(v, 2)
                                    for k, v in slopes.items()},
            "ranges_after_warmup": ranges, "start_end": back, "verdict": verdict}


def table(result: dict[str, Any], rows: int = 24) -> str:
    """A Markdown table of about ``rows`` samples spread over the run, then the findings."""
    samples = result["samples"]
    step = max(1, len(samples) // rows)
    picked = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    lines = ["| min | phase | sensor RSS MiB | ring MiB | fds | threads | vSensor RSS MiB | "
             "fds | threads | vSensor age s | spool chunks | pod | action |",
             "|" + "---|" * 13]
    for s in picked:
        sensor, vsensor = s["sensor"], s["vsensor"]
        lines.append(
            f"| {s['t'] / 60:.1f} | {s['phase']} | {sensor['rss_mib']:.1f} | "
            f"{sensor['ring_mib']:.1f} | {sensor['fds']} | {sensor['threads']} | "
            f"{vsensor['rss_mib']:.1f} | {vsensor['fds']} | {vsensor['threads']} | "
            f"{vsensor['age']:.0f} | {s['spool_chunks']} | {'yes' if s['pod'] else ''} | "
            f"{'yes' if s['action'] else ''} |")
    slopes, verdict = result["slopes_mib_per_hour"], result["verdict"]
    lines += ["", f"sent {result['sent']:,}, stored once {result['stored_once']:,}, missing "
              f"{result['missing']:,}, stored more than once {result['stored_twice_or_more']:,}",
              f"events: {result['events']}; exit codes {result['exit_codes']}",
              f"slopes after {result['warmup_seconds'] / 60:.1f} min of warm-up, over "
              f"{verdict['fit_hours']:.2f} h (MiB/h): sensor {slopes['sensor']}, without the "
              f"extra pod {slopes['sensor_without_pod']}, vSensor {slopes['vsensor']}",
              f"quiet state start -> end: {result['start_end']}",
              f"verdict: {verdict}"]
    if result.get("heap"):
        lines += ["", "sensor heap growth (tracemalloc, warm-up end -> end):", *result["heap"]]
    if result.get("vsensor_heap"):
        lines += ["", "vSensor heap, the first process after the warm-up -> the last, each just "
                  "before its restart (tracemalloc):", *result["vsensor_heap"]]
    return "\n".join(lines)


def heap_diff(paths: list[Path], top: int = 12) -> list[str]:
    """The lines whose Python allocations grew most between the snapshot taken after the
    warm-up (or the first) and the last."""
    if len(paths) < 2:
        return []
    paths = sorted(paths, key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    first = paths[1] if len(paths) > 2 else paths[0]
    older = tracemalloc.Snapshot.load(str(first))
    newer = tracemalloc.Snapshot.load(str(paths[-1]))
    traced = sum(s.size for s in newer.statistics("filename")) / 2**20
    stats = newer.compare_to(older, "lineno")
    return [f"  traced {traced:.1f} MiB at the end"] + [f"  {stat}" for stat in stats[:top]]


def vsensor_heap_diff(paths: list[Path], warmup: float, top: int = 12) -> list[str]:
    """What a late vSensor process holds more than an early one at the same age: the
    snapshots are named ``at-SECONDSs`` (the run's clock when taken, just before a restart);
    the first after the warm-up is compared with the last."""
    def when(path: Path) -> float:
        return float(path.stem.removeprefix("at-").removesuffix("s"))

    after = [p for p in sorted(paths, key=when) if when(p) >= warmup]
    if len(after) < 2:
        return []
    older = tracemalloc.Snapshot.load(str(after[0]))
    newer = tracemalloc.Snapshot.load(str(after[-1]))
    traced = [sum(s.size for s in snap.statistics("filename")) / 2**20
              for snap in (older, newer)]
    stats = newer.compare_to(older, "lineno")
    return ([f"  traced {traced[0]:.1f} MiB at {when(after[0]):.0f} s, {traced[1]:.1f} MiB at "
             f"{when(after[-1]):.0f} s ({len(after)} processes after the warm-up)"]
            + [f"  {stat}" for stat in stats[:top]])


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS, descriptors and threads of both processes over the run, the warm-up shaded and
    the fitted lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in result["samples"] if s["phase"] == "run"]
    minutes = [s["t"] / 60 for s in samples]
    figure, (memory, fds, threads) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for who, colour in (("sensor", "tab:blue"), ("vsensor", "tab:orange")):
        memory.plot(minutes, [s[who]["rss_mib"] for s in samples], ".", ms=3, color=colour,
                    label=f"{who} RSS outside rings")
        fds.plot(minutes, [s[who]["fds"] for s in samples], "-", lw=1, color=colour, label=who)
        threads.plot(minutes, [s[who]["threads"] for s in samples], "-", lw=1, color=colour,
                     label=who)
    warmup = result["warmup_seconds"] / 60
    after = [s for s in samples if s["t"] / 60 >= warmup]
    value = result["slopes_mib_per_hour"]["sensor"]
    if value is not None and after:
        t = [s["t"] for s in after]
        v = [s["sensor"]["rss_mib"] for s in after]
        mean_t, mean_v = sum(t) / len(t), sum(v) / len(v)
        memory.plot([t[0] / 60, t[-1] / 60],
                    [mean_v + value * (t[0] - mean_t) / 3600,
                     mean_v + value * (t[-1] - mean_t) / 3600],
                    "k--", lw=1, label=f"sensor fit {value:+.2f} MiB/h")
    for axis in (memory, fds, threads):
        axis.axvspan(0, warmup, color="0.9", lw=0)
        axis.legend(loc="best", fontsize=8)
        axis.grid(alpha=0.3)
    memory.set_ylabel("MiB")
    fds.set_ylabel("descriptors")
    threads.set_ylabel("threads")
    threads.set_xlabel("minutes (warm-up shaded)")
    plan = result["plan"]
    memory.set_title(f"make soak: {plan['minutes']:g} min, {plan['rate']} datagrams/s, pod every "
                     f"{plan['churn']:g} s, vSensor restart {plan['restart']:g} s, Antigena "
                     f"{plan['antigena']:g} s", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_outputs(result: dict[str, Any], json_path: Path, png_path: Path | None) -> str:
    """Write the JSON (and the PNG); return the table."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    if png_path is not None:
        plot(result, png_path)
        text += f"\n\nwrote {json_path} and {png_path}"
    return text
