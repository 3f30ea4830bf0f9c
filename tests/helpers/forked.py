"""Many short runs of a command's ``main`` as real processes, fast: import once, fork per run.

A driver process imports the command's module once; each case is a child forked from it with
its own environment (bytes, so that values that are not UTF-8 arrive as the kernel gives them),
argv, working folder, stdout and stderr files, and ends with ``os._exit`` of what ``main``
returned. An exception that escapes ``main`` is printed as Python prints it (``Traceback ...``):
that is what the tests look for. Two children run at once (the machine has two cores); each is
killed after ``timeout`` seconds (an alarm), or stopped with SIGTERM after ``stop_after``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_DRIVER = r'''
import importlib, json, os, signal, sys, traceback
spec = json.load(sys.stdin)
module = importlib.import_module(spec["module"])
for name in spec["preload"]:
    importlib.import_module(name)
if spec["warmup"]:  # fill the caches (entry points, CAs) that every child would fill again
    exec(spec["warmup"])
running, results = {}, {}

def reap():
    pid, status = os.waitpid(-1, 0)
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for index, case in enumerate(spec["cases"]):
    while len(running) >= spec["parallel"]:
        reap()
    pid = os.fork()
    if pid:
        running[pid] = index
        continue
    code = 1
    try:
        os.chdir(case["cwd"])
        for fd, name in ((1, "out"), (2, "err")):
            target = os.open(os.path.join(case["cwd"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        os.environb.clear()
        os.environb.update({bytes.fromhex(k): bytes.fromhex(v) for k, v in case["env"]})
        sys.argv = [spec["prog"], *(os.fsdecode(bytes.fromhex(a)) for a in case["argv"])]
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        if spec["stop_after"]:
            signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
            signal.alarm(spec["stop_after"])
        else:
            signal.alarm(spec["timeout"])
        try:
            code = module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
while running:
    reap()
json.dump([results[i] for i in range(len(spec["cases"]))], sys.stdout)
'''


@dataclass(frozen=True)
class Case:
    """One run: its environment and arguments as bytes."""

    env: Mapping[bytes, bytes]
    argv: Sequence[bytes] = ()


@dataclass(frozen=True)
class Ran:
    case: Case
    code: int
    stdout: str
    stderr: str


def run_forked(module: str, prog: str, cases: Sequence[Case], work: Path, *,
               preload: Sequence[str] = (), warmup: str = "", prefix: Sequence[str] = (),
               parallel: int = 2, timeout: int = 30, stop_after: int = 0) -> list[Ran]:
    """Run ``module.main()`` once per case, each in its own process and folder under ``work``;
    ``prefix`` runs the driver through a command (``ip netns exec NAME``), ``warmup`` is code
    the driver runs once before the first fork."""
    folders = []
    for index, _ in enumerate(cases):
        folder = work / f"case-{index}"
        folder.mkdir(parents=True)
        folders.append(folder)
    spec = {"module": module, "prog": prog, "preload": list(preload), "warmup": warmup,
            "parallel": parallel,
            "timeout": timeout, "stop_after": stop_after,
            "cases": [{"cwd": str(folder), "argv": [a.hex() for a in case.argv],
                       "env": [[k.hex(), v.hex()] for k, v in case.env.items()]}
                      for case, folder in zip(cases, folders)]}
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": pythonpath,
           "LANG": "C.UTF-8"}
    done = subprocess.run([*prefix, sys.executable, "-c", _DRIVER], input=json.dumps(spec), env=env,
                          capture_output=True, text=True,
                          timeout=60 + len(cases) * (stop_after or timeout) / parallel)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout)
    return [Ran(case, code, (folder / "out").read_text(errors="backslashreplace"),
                (folder / "err").read_text(errors="backslashreplace"))
            for case, code, folder in zip(cases, codes, folders)]
