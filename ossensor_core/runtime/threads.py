"""Thread names the kernel knows, so that ``top -H``, ``/proc/PID/task/*/comm`` and the benchmark's
per-thread CPU tell the capture loop from the encoders and the uploader."""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Callable

_PR_SET_NAME = 15


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name), cut to the kernel's 15
    bytes; does nothing where prctl is not available."""
    prctl = _prctl()
    if prctl is not None:
        text = (name or threading.current_thread().name).encode()[:15]
        prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)


def named_executor(prefix: str, workers: int | None = None,
                   start_all: bool = False) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads carry ``prefix`` in the kernel too. ``start_all``: start
    every thread now (``workers``, default what ``ThreadPoolExecutor`` picks) instead of one
    more whenever all are busy, so the process's thread count is the same after a busy hour as
    after start-up (a leak shows; a pool that grew under load does not look like one)."""
    if not start_all:
        return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=prefix,
                                                     initializer=name_os_thread)
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=prefix,
                                                 initializer=name_os_thread)
    # Each task holds its thread until all have one: the pool starts a thread for each.
    everyone = threading.Barrier(workers)
    started = [pool.submit(everyone.wait, 10.0) for _ in range(workers)]
    concurrent.futures.wait(started, timeout=15.0)
    return pool
