"""Running the ``ossensor`` command in a subprocess, as users and Kubernetes do."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.netns import Namespace

COMMAND = [sys.executable, "-m", "ossensor_core.cli"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def ossensor(args: Sequence[str], env: Mapping[str, str], ns: Namespace | None = None,
             timeout: float = 60) -> Result:
    prefix = ns.prefix() if ns is not None else []
    done = subprocess.run([*prefix, *COMMAND, *args], env=dict(env), capture_output=True,
                          text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)
