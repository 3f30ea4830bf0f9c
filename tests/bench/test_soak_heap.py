"""``make soak --heap`` for the vSensor: each process is snapshotted at the same age, and a late
one is compared with the first one after the warm-up."""

from __future__ import annotations

import tracemalloc

from bench.soak_report import vsensor_heap_diff

HELD: list[bytes] = []


def _snapshot(path) -> None:
    tracemalloc.take_snapshot().dump(str(path))


def test_the_late_process_is_compared_with_the_first_after_the_warm_up(tmp_path):
    tracemalloc.start(1)
    try:
        HELD.append(b"w" * 300_000)  # in the warm-up snapshot only: must not be the baseline
        _snapshot(tmp_path / "at-00000050s.tracemalloc")
        HELD.clear()
        _snapshot(tmp_path / "at-00000200s.tracemalloc")
        HELD.append(b"x" * 500_000)  # what the late process holds more
        _snapshot(tmp_path / "at-00000350s.tracemalloc")
    finally:
        tracemalloc.stop()
        HELD.clear()
    lines = vsensor_heap_diff(sorted(tmp_path.glob("at-*")), warmup=100)
    assert "at 200 s" in lines[0] and "at 350 s" in lines[0] and "(2 processes" in lines[0]
    assert "test_soak_heap.py" in lines[1] and "+488 KiB" in lines[1], lines
    assert vsensor_heap_diff(sorted(tmp_path.glob("at-*")), warmup=300) == []
