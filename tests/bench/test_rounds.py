"""``make bench --rounds N``: ratios against both anchors of the same round, targets on
medians."""

from __future__ import annotations

from bench.run import add_ratios, merge_rounds, table, verdicts


def trial(capturer: str, number: int, us: float, lost: int = 0, rss: float = 80.0,
          traffic: str = "udp64@max") -> dict:
    kind = "routed" if traffic.startswith("routed") else "udp"
    return {"capturer": capturer, "traffic": traffic, "kind": kind, "frame_bytes": 64,
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


def test_ratios_to_both_anchors_and_the_routed_targets_against_socat():
    sensor = "ossensor daemonset"
    trials = []
    for number, (tcpdump, socat, mine) in enumerate([(0.1, 0.2, 0.4), (0.1, 0.25, 0.3),
                                                     (0.2, 0.4, 0.5)], start=1):
        trials += [trial("tcpdump", number, tcpdump, traffic="routed@max"),
                   trial("tcpdump|socat", number, socat, traffic="routed@max"),
                   {**trial(sensor, number, mine, traffic="routed@max"),
                    "stored_twice": 2 if number == 2 else 0}]
    add_ratios(trials)
    assert [t["ratio_to_socat"] for t in trials if t["capturer"] == sensor] == [2.0, 1.2, 1.25]
    assert [t["ratio_to_tcpdump"] for t in trials if t["capturer"] == sensor] == [4.0, 3.0, 2.5]
    merged = {row["capturer"]: row for row in merge_rounds(trials)}
    row = merged[sensor]
    assert row["ratio_to_socat"] == 1.25 and row["ratio_to_tcpdump"] == 3.0
    assert row["ratios_to_socat"] == [2.0, 1.2, 1.25] and row["stored_twice"] == 2
    assert merged["tcpdump|socat"]["ratio_to_tcpdump"] == 2.0
    checks = {c["target"].split(": ", 1)[1]: c for c in verdicts(list(merged.values()))}
    assert checks["CPU/packet vs tcpdump|socat <= 1.5"] == {
        "target": "routed@max: CPU/packet vs tcpdump|socat <= 1.5", "measured": 1.25,
        "holds": True}
    assert checks["every packet stored exactly once (lost, stored twice)"]["holds"] is False
    lines = table(list(merged.values())).splitlines()
    assert "x tcpd" in lines[0] and "x socat" in lines[0]
    sensor_line = lines[-1].split()
    assert sensor_line[:7] == ["routed@max", "ossensor", "daemonset", "1000", "1000", "2", "0"]
    assert sensor_line[7:11] == ["0.000", "0.400", "3.00", "1.25"]  # CPU s, us/pkt, ratios
