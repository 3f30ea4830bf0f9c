"""Thread names the kernel knows, so that ``top -H``, ``/proc/PID/task/*/comm`` and the benchmark's
per-thread CPU tell the capture loop from the encoders and the uploader."""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import functools
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


def named_executor(prefix: str,
                   workers: int | None = None) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads carry ``prefix`` in the kernel too."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=prefix,
                                                 initializer=name_os_thread)
