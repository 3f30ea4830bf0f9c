"""bench/cluster_ingest.py, run small: both modes take every chunk and report their CPU."""

from __future__ import annotations

import json

from bench.cluster_ingest import main
from tests.helpers.nats import needs_nats


@needs_nats
def test_a_small_run_reports_both_modes(tmp_path):
    out = tmp_path / "ingest.json"
    assert main(["--chunks", "6", "--packets", "512", "--in-flight", "2",
                 "--json", str(out)]) == 0
    single, cluster = json.loads(out.read_text())
    assert (single["mode"], cluster["mode"]) == ("single", "cluster")
    for row in (single, cluster):
        assert row["packets"] == 6 * 512 and row["vsensor_us_per_packet"] > 0
    assert single["nats_us_per_packet"] is None and cluster["nats_us_per_packet"] > 0
