"""`make bench` in small: a few thousand packets per trial, so that the benchmark cannot rot.

The figures of a smoke run mean nothing (start-up and idle costs dominate); what is checked is
that every capturer stores exactly what was sent and that the report has every field. The routed
trial runs too (``routed64@max``, a few thousand numbered datagrams through node A to its pod):
nothing lost, the anchors store each datagram once, and the sensor's copies are counted, whatever
the DaemonSet loads (with or without ``dedup``; whether it stores each one exactly once is the
benchmark's verdict, reported, not asserted here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import TRIAL_FIELDS
from tests.helpers.netns import needs_netns

REPO = Path(__file__).resolve().parents[2]


@needs_netns
@pytest.mark.skipif(any(shutil.which(t) is None for t in ("trafgen", "iperf3", "socat",
                                                          "tcpreplay")),
                    reason="needs trafgen, iperf3, socat and tcpreplay (make setup)")
def test_bench_smoke_stores_everything_and_reports_every_field(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {"started", "seconds", "smoke", "machine", "trials", "targets",
            "filters"} <= report.keys()
    assert {f["filter"].split()[0] for f in report["filters"]} == {"dedup", "slice"}
    assert all(f["ns_per_packet"] > 0 for f in report["filters"])
    dedup = report["filters"][0]
    assert dedup["dropped"] == dedup["packets"] // 2  # every packet was seen on two interfaces
    trials = report["trials"]
    capturers = {t["capturer"] for t in trials}
    assert capturers == {"tcpdump", "tcpdump|socat", "ossensor afpacket/https",
                         "ossensor afpacket/file", "ossensor scapy/https", "ossensor daemonset"}
    assert {t["kind"] for t in trials} == {"udp", "tcp", "routed"}
    for trial in trials:
        where = f"{trial.get('traffic')} / {trial.get('capturer')}"
        missing = [f for f in TRIAL_FIELDS if f not in trial]
        assert not missing, f"{where}: no {missing}"
        assert trial["sent"] > 0, where
        assert trial["stored"] == trial["sent"], f"{where}: stored {trial['stored']} of " \
                                                 f"{trial['sent']}"
        assert trial["kernel_drops"] == 0, where
        assert trial["cpu_seconds"] > 0 and trial["cpu_us_per_packet"] > 0, where
        assert trial["ratio_to_tcpdump"] is not None, where
        assert trial["ratio_to_socat"] is not None, where
        assert trial["peak_rss_mib"] > 0, where
        if trial["capturer"].startswith("ossensor afpacket"):
            assert trial["peak_ring_rss_mib"] > 0, f"{where}: the ring is not seen in smaps"
            assert trial.get("exit_code") == 0, where
        if trial["capturer"].endswith("/https") or trial["capturer"] == "ossensor daemonset":
            assert trial["helper_cpu_seconds"]["vsensor"] > 0, where
            assert trial["vsensor_exit_code"] == 0, where
        if trial["capturer"] == "tcpdump|socat":
            assert (trial["exit_code"], trial["receiver_exit_code"]) == (0, 0), where
            assert trial["helper_cpu_seconds"]["receiver"] > 0, where
        if trial["kind"] == "routed":
            # Every numbered datagram crossed node A's uplink and the pod's veth.
            assert trial["pod_rx_delta"] >= trial["sent"] > 0, where
            counted = trial["stored_once"] + trial["stored_twice"]
            assert counted == trial["stored"] and trial["unexpected_numbers"] == 0, where
            if trial["capturer"].startswith("tcpdump"):
                assert trial["stored_twice"] == 0, f"{where}: the uplink alone, once each"
            else:
                assert trial["exit_code"] == 0, where
                assert set(trial["kernel_drops_by_interface"]) >= {"up0", "pv0"}, where
                assert "plugins" in trial, where
    assert report["targets"], "no target was evaluated"
    assert all({"target", "measured", "holds"} <= t.keys() for t in report["targets"])
    # The table names every trial.
    assert done.stdout.count("\n") >= len(trials) + 2
