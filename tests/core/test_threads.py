"""Worker threads carry their names in the kernel (``/proc/self/task/*/comm``)."""

from __future__ import annotations

import threading
from pathlib import Path

from ossensor_core.runtime.threads import named_executor


def test_pool_threads_are_named_in_the_kernel():
    with named_executor("ossensor-test", 1) as pool:
        tid = pool.submit(threading.get_native_id).result()
        comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    assert comm == "ossensor-test_0"
