"""The chunk sequences a vSensor remembers per sensor, to recognise a retry.

A sensor numbers its chunks from its clock (``time.time_ns()`` at start) and adds one per chunk,
so what a vSensor stores of one sensor is a few runs of consecutive numbers: one per sensor run,
one per run of split parts (their own numbering, see the HTTPS transport's ``split`` module).
:class:`SequenceWindow` keeps those runs as sorted ranges in two arrays of 64-bit integers, so it
costs 16 bytes per run however many chunks a run holds; an ``OrderedDict`` of the same 65,536
sequences costs 8 MiB per sensor (measured with tracemalloc) and grows with every chunk until it is full.

When more than ``size`` sequences are remembered, the lowest are forgotten first: with sequences
taken from the clock, the lowest are the oldest. (A sensor whose clock stepped back across a
restart has its new run forgotten before the older, higher one; only once the window is full,
and what that costs is a retry stored twice, never a chunk lost.)
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable


class SequenceWindow:
    """A set of unsigned 64-bit sequences holding at most ``size`` of them, the lowest
    forgotten first; memory grows with the number of runs of consecutive sequences, never with
    their length."""

    __slots__ = ("size", "_starts", "_lasts", "_count")

    def __init__(self, size: int, sequences: Iterable[int] = ()) -> None:
        if size < 1:
            raise ValueError(f"a sequence window holds at least 1 sequence, not {size}")
        self.size = size
        # Range i holds _starts[i] to _lasts[i], both included (so 2**64 - 1 fits); ranges
        # are sorted, disjoint and never adjacent.
        self._starts = array("Q")
        self._lasts = array("Q")
        self._count = 0
        for sequence in sequences:
            self.add(sequence)

    def __len__(self) -> int:
        return self._count

    @property
    def runs(self) -> int:
        """How many ranges of consecutive sequences are held."""
        return len(self._starts)

    def __contains__(self, sequence: int) -> bool:
        i = bisect_right(self._starts, sequence) - 1
        return i >= 0 and sequence <= self._lasts[i]

    def add(self, sequence: int) -> None:
        """Remember ``sequence`` (0 <= sequence < 2**64), forgetting the lowest ones beyond
        ``size``."""
        if not 0 <= sequence < 1 << 64:
            raise ValueError(f"sequence {sequence} is not an unsigned 64-bit number")
        starts, lasts = self._starts, self._lasts
        i = bisect_right(starts, sequence)  # ranges before i start at or below sequence
        if i and sequence <= lasts[i - 1]:
            return  # already held
        joins_left = i > 0 and lasts[i - 1] == sequence - 1
        joins_right = i < len(starts) and starts[i] == sequence + 1
        if joins_left and joins_right:
            lasts[i - 1] = lasts[i]
            del starts[i], lasts[i]
        elif joins_left:
            lasts[i - 1] = sequence
        elif joins_right:
            starts[i] = sequence
        else:
            starts.insert(i, sequence)
            lasts.insert(i, sequence)
        self._count += 1
        self._forget(self._count - self.size)

    def _forget(self, excess: int) -> None:
        """Drop the ``excess`` lowest sequences."""
        starts, lasts = self._starts, self._lasts
        drop = 0  # whole ranges from the front
        while excess > 0:
            length = lasts[drop] - starts[drop] + 1
            if length <= excess:
                excess -= length
                self._count -= length
                drop += 1
            else:
                starts[drop] += excess
                self._count -= excess
                excess = 0
        if drop:
            del starts[:drop], lasts[:drop]
