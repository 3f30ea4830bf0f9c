"""``make bench --rounds N``: ratios against tcpdump of the same round, targets on medians."""

from __future__ import annotations

from bench.run import add_ratios, merge_rounds, verdicts


def trial(capturer: str, number: int, us: float, lost: int = 0, rss: float = 80.0) -> dict:
    return {"capturer": capturer, "traffic": "udp64@max", "kind": "udp", "frame_bytes": 64,
            "rate_pps": None, "sent": 1000, "stored": 1000 - lost, "kernel_drops": 0,
            "lost": lost, "loss_percent": lost / 10, "cpu_seconds": us / 1000,
            "cpu_us_per_packet": us, "helper_cpu_seconds": {"vsensor": 0.5},
            "peak_rss_mib": rss + 16, "peak_ring_rss_mib": 16.0,
            "peak_rss_outside_ring_mib": rss, "round": number}


def test_each_ratio_uses_its_rounds_tcpdump_and_targets_use_the_median():
    sensor = "ossensor afpacket/https"
    trials = [trial("tcpdump", 1, 0.2), trial(sensor, 1, 0.3),
              trial("tcpdump", 2, 0.1), trial(sensor, 2, 0.4, rss=99.0),  # a noisy round
              trial("tcpdump", 3, 0.2), trial(sensor, 3, 0.28, lost=1)]
    add_ratios(trials)
    assert [t["ratio_to_tcpdump"] for t in trials if t["capturer"] == sensor] == [1.5, 4.0, 1.4]
    merged = {row["capturer"]: row for row in merge_rounds(trials)}
    row = merged[sensor]
    assert row["rounds"] == 3 and row["ratios"] == [1.5, 4.0, 1.4]
    assert row["ratio_to_tcpdump"] == 1.5 and row["cpu_us_per_packet"] == 0.3
    # Loss and memory: the worst round, not the median.
    assert row["lost"] == 1 and row["stored"] == 999 and row["round"] == 3
    assert row["peak_rss_outside_ring_mib"] == 99.0
    checks = {c["target"].split(": ", 1)[1]: c for c in verdicts(list(merged.values()))}
    assert checks["CPU/packet vs tcpdump <= 1.5"]["holds"] is True
    assert checks["loss < 0.01 % unpaced"]["holds"] is False
    assert checks["RSS outside the ring <= 96 MiB"]["measured"] == 99.0
