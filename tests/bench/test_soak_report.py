"""The soak's verdict: two hours after the warm-up are shown when the samples cover them."""

from __future__ import annotations

from bench.soak_report import report


def _result(minutes: float, sample: float = 10.0, growth_per_hour: float = 0.5) -> dict:
    def process(t: float) -> dict:
        return {"pid": 1, "rss_mib": 60 + growth_per_hour * t / 3600, "ring_mib": 32.0,
                "fds": 16, "threads": 8}

    times = [sample * i for i in range(1, int(minutes * 60 / sample))]  # the last: "end"
    samples = [{"t": t, "phase": "run", "pod": False, "action": False, "sensor": process(t),
                "vsensor": {**process(t), "age": t}} for t in times]
    end = {**samples[-1], "phase": "end"}
    return {"plan": {"sample": sample}, "warmup_seconds": 900.0, "samples": samples,
            "events": {"restarts": 0}, "start": samples[0], "end": end, "sent": 10,
            "stored_once": 10, "missing": 0, "stored_twice_or_more": 0}


def test_a_135_minute_run_shows_two_hours_and_a_shorter_one_does_not():
    verdict = report(_result(135))["verdict"]
    assert verdict["target_shown"] and verdict["slopes_under_target"], verdict
    assert verdict["fit_hours"] == 2.0  # 7,190 s from the first to the last sample
    assert not report(_result(134))["verdict"]["target_shown"]


def test_a_slope_over_the_target_is_reported_as_such():
    result = report(_result(135, growth_per_hour=1.5))
    assert result["slopes_mib_per_hour"]["sensor"] == 1.5
    assert not result["verdict"]["slopes_under_target"]
