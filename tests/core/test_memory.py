"""The allocator settings and the periodic tidy-up of ``ossensor_core.runtime.memory``, each in a
fresh interpreter (a freeze or a trim must not leak into the test process)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_python(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


RSS = '''
def rss_mib():
    with open("/proc/self/status") as status:
        line = next(l for l in status if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
'''


def test_freed_heap_in_the_middle_goes_back_to_the_kernel():
    """100 MiB of chunk-sized buffers freed below a live allocation stay resident with the
    buffer settings (only the top of the heap is trimmed by itself); tidy() returns them."""
    result = run_python(RSS + '''
import json
from ossensor_core.runtime.memory import keep_buffers_mapped, tidy
assert keep_buffers_mapped()
buffers = [bytearray(1 << 20) for _ in range(100)]  # heap, not mmap: below the threshold
keep = bytearray(1 << 20)  # above them: the freed space is not at the top
peak = rss_mib()
del buffers
freed = rss_mib()
tidy()
print(json.dumps({"peak": peak, "freed": freed, "tidied": rss_mib()}))
''')
    assert result["peak"] - result["freed"] < 20, result  # kept by the allocator...
    assert result["freed"] - result["tidied"] > 80, result  # ...until the trim


def test_cycles_are_collected_and_start_up_is_frozen():
    """Cycles that reached the oldest generation are freed by the periodic pass, the first pass
    freezes what survived it, later passes still find new garbage."""
    result = run_python('''
import asyncio, gc, json, logging
from ossensor_core.runtime import memory
class Node:
    def __init__(self):
        self.me = self
gc.disable()  # what the automatic collector would leave in the oldest generation for a while
cycles = [Node() for _ in range(5000)]
del cycles
found = []
real_tidy = memory.tidy
def counting_tidy(freeze=False):
    result = real_tidy(freeze)
    found.append((result[0], gc.get_freeze_count()))
    if len(found) == 1:
        more = [Node() for _ in range(300)]  # garbage made after the freeze
    return result
memory.tidy = counting_tidy
async def main():
    task = asyncio.create_task(memory.tidy_periodically(0.05))
    await asyncio.sleep(0.3)
    task.cancel()
asyncio.run(main())
print(json.dumps(found))
''')
    (first, frozen_first), (second, frozen_second) = result[0], result[1]
    assert first >= 5000 and frozen_first > 1000, result
    assert second >= 300 and 1000 < frozen_second <= frozen_first, result  # not re-frozen
