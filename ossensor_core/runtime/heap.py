"""Python heap snapshots on demand, to find what grows in a long run (off by default).

With ``OSSENSOR_TRACEMALLOC=DIR`` the sensor starts :mod:`tracemalloc` (10 frames) before
anything else and writes a snapshot to ``DIR/heap-PID-N.tracemalloc`` at every ``SIGUSR2``;
``make soak SOAK_ARGS=--heap`` compares the first and the last (``bench/soak_report.py``). Tracing
costs CPU and memory of its own: for diagnosis (``make soak`` with ``--heap``), never in
production. Without the variable nothing is started and ``SIGUSR2`` keeps its default action.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

log = logging.getLogger("ossensor.heap")

VARIABLE = "OSSENSOR_TRACEMALLOC"
FRAMES = 10


def snapshots_on_signal(environ: Mapping[str, str]) -> Path | None:
    """Start tracing and dump a snapshot at each SIGUSR2 when ``OSSENSOR_TRACEMALLOC`` names a
    folder; returns the folder (None: nothing done)."""
    folder = environ.get(VARIABLE, "")
    if not folder:
        return None
    where = Path(folder)
    where.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(FRAMES)
    numbers = itertools.count(1)

    def dump(signum: int, frame: FrameType | None) -> None:
        path = where / f"heap-{os.getpid()}-{next(numbers)}.tracemalloc"
        tracemalloc.take_snapshot().dump(str(path))
        log.info("heap snapshot %s (%.1f MiB traced)", path,
                 tracemalloc.get_traced_memory()[0] / 2**20)

    signal.signal(signal.SIGUSR2, dump)
    return where
