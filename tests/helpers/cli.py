"""Running the ``ossensor`` command in a subprocess, as users and Kubernetes do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.netns import Namespace

COMMAND = [sys.executable, "-m", "ossensor_core.ops.cli"]
TEST_KEY = "Kx9secretHMACkey42"


def clean_environment(**values: str) -> dict[str, str]:
    """The caller's environment without its sensor variables, plus ``values``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OSSENSOR_", "VSENSOR_", "NETWORK_DEVICE_", "ANTIGENA_"))
           and k != "BPF"}
    env.update(values)
    return env


def sensor_environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A minimal valid sensor environment, free of the caller's sensor variables; the config
    file and the output go into ``tmp_path``, never /etc."""
    env = clean_environment()
    env.update({
        "VSENSOR_HOSTNAME": "vsensor.test",
        "VSENSOR_HMAC_KEY": TEST_KEY,
        "OSSENSOR_CONFIG_PATH": str(tmp_path / "etc" / "ossensor.cfg"),
        "OSSENSOR_TRANSPORT": "file",
        "OSSENSOR_OUTPUT_DIR": str(tmp_path / "out"),
    })
    env.update(overrides)
    return env


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
