"""Thread names the kernel knows, so that ``top -H``, ``/proc/PID/task/*/comm`` and the benchmark's
per-thread CPU tell the capture loop from the encoders and the uploader."""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import threading

_PR_SET_NAME = 15
_libc = None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name), cut to the kernel's 15
    bytes; does nothing where prctl is not available."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    if _libc:
        text = (name or threading.current_thread().name).encode()[:15]
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)


def named_executor(prefix: str,
                   workers: int | None = None) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads carry ``prefix`` in the kernel too."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=prefix,
                                                 initializer=name_os_thread)
