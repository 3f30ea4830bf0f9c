"""Keeping large buffers warm: the C allocator settings of the sensor and the vSensor.

Every chunk is a few large buffers (the copy out of the ring, the encoded body, the compressed
body). glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and returns
them with ``munmap`` on free, so each chunk pays a page fault per 4 KiB: copying 1 MiB that way
ran at about 1 GB/s here, against 7 GB/s into reused heap memory. Raising the mmap threshold
above the largest chunk buffer and keeping freed heap memory (no trimming) makes those buffers
come from memory that is already mapped. Resident memory stays bounded by the peak in use,
which the queue and chunk limits already bound.

What is kept must also be given back, or a process that runs for months grows in steps:
:func:`tidy_periodically` runs beside the sensor and the vSensor. Python's automatic collector
reaches the oldest generation rarely, so reference cycles that live a little while (pyroute2's
netlink messages on every link or route event, the TLS objects of a dropped connection) pile up
there between its full passes; a full collection every half minute frees them, and
``malloc_trim`` then hands the freed heap back to the kernel. After the first pass, what start-up
built (modules, settings, plugins) is frozen out of later passes, which then look only at what
was allocated since (``docs/soak.md`` has the figures).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

from ossensor_core.runtime.logsetup import level

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for this setting (HEAP_MAX / 2 on 64-bit)
TRIM_THRESHOLD = 16 << 20  # free memory kept at the top of the heap: a few chunk buffers
ARENA_MAX = 2  # worker threads share arenas instead of each keeping its own free memory
TIDY_SECONDS = 30.0  # a full collection and a trim this often


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))[name]
    except (OSError, AttributeError, TypeError):
        return None


def keep_buffers_mapped() -> bool:
    """Tune glibc's malloc for large reused buffers; False (and nothing changed) elsewhere."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        log.debug("no mallopt in the C library: allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))
    if not done:
        log.debug("mallopt refused the buffer settings: allocator left as it is")
    return done


def tidy(freeze: bool = False) -> tuple[int, float]:
    """One full collection (then, with ``freeze``, what survived it is left out of later ones)
    and a heap trim; returns the unreachable objects found and the seconds it took."""
    started = time.perf_counter()
    found = gc.collect()
    if freeze:
        gc.freeze()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
    return found, time.perf_counter() - started


async def tidy_periodically(period: float = TIDY_SECONDS) -> None:
    """Run :func:`tidy` every ``period`` seconds until cancelled (the first pass freezes)."""
    passes = 0
    while True:
        await asyncio.sleep(period)
        found, took = tidy(freeze=passes == 0)
        passes += 1
        log.log(level(1), "%d unreachable objects freed and the heap trimmed in %.1f ms",
                found, took * 1000)
