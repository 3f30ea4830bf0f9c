"""Keeping large buffers warm: the C allocator settings of the sensor and the vSensor.

Every chunk is a few large buffers (the copy out of the ring, the encoded body, the compressed
body). glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and returns
them with ``munmap`` on free, so each chunk pays a page fault per 4 KiB: copying 1 MiB that way
ran at about 1 GB/s here, against 7 GB/s into reused heap memory. Raising the mmap threshold
above the largest chunk buffer and keeping freed heap memory (no trimming) makes those buffers
come from memory that is already mapped. Resident memory stays bounded by the peak in use,
which the queue and chunk limits already bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's upper bound for this setting (HEAP_MAX / 2 on 64-bit)
TRIM_THRESHOLD = 16 << 20  # free memory kept at the top of the heap: a few chunk buffers
ARENA_MAX = 2  # worker threads share arenas instead of each keeping its own free memory


def keep_buffers_mapped() -> bool:
    """Tune glibc's malloc for large reused buffers; False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in the C library (%s): allocator left as it is", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))
    if not done:
        log.debug("mallopt refused the buffer settings: allocator left as it is")
    return done
