"""The per-sensor window of stored chunk sequences (vsensor/ossensor_vsensor/sequences.py)."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ossensor_vsensor.sequences import SequenceWindow

TOP = (1 << 64) - 1


class Model:
    """What the window must behave like: a plain set that drops its lowest members."""

    def __init__(self, size: int) -> None:
        self.size, self.held = size, set()

    def add(self, sequence: int) -> None:
        self.held.add(sequence)
        while len(self.held) > self.size:
            self.held.remove(min(self.held))


# Sequences near each other (so that runs join, split and fill) and near both ends of the range.
near = st.one_of(st.integers(0, 40), st.integers(TOP - 40, TOP),
                 st.integers(1_700_000_000_000_000_000, 1_700_000_000_000_000_040))


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 30), sequences=st.lists(near, max_size=120),
       probes=st.lists(near, max_size=40))
def test_the_window_holds_what_a_set_dropping_its_lowest_holds(size, sequences, probes):
    window, model = SequenceWindow(size), Model(size)
    for sequence in sequences:
        window.add(sequence)
        model.add(sequence)
        assert len(window) == len(model.held)
    for sequence in set(sequences) | set(probes):
        assert (sequence in window) == (sequence in model.held), sequence
    # The ranges are as few as the held sequences allow: one per run of consecutive numbers.
    ordered = sorted(model.held)
    assert window.runs == sum(1 for i, s in enumerate(ordered) if i == 0 or ordered[i - 1] != s - 1)


def test_a_sensor_run_of_65536_chunks_is_one_range_of_a_few_bytes():
    start = 1_765_000_000_000_000_000  # time.time_ns() at a sensor's start
    window = SequenceWindow(65536, range(start, start + 70_000))
    assert len(window) == 65536 and window.runs == 1
    assert start + 70_000 - 65536 in window and start + 70_000 - 65537 not in window
    held = sys.getsizeof(window._starts) + sys.getsizeof(window._lasts)
    assert held < 1024, held  # an OrderedDict of 65,536 ints: several MiB


@pytest.mark.parametrize("sequence", [-1, 1 << 64])
def test_a_sequence_outside_64_bits_is_refused(sequence):
    with pytest.raises(ValueError, match=f"sequence {sequence} is not an unsigned 64-bit"):
        SequenceWindow(4).add(sequence)
