"""Every vSensor module imports on its own with warnings as errors."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import ossensor_vsensor

MODULES = ["ossensor_vsensor"] + [
    m.name for m in pkgutil.walk_packages(ossensor_vsensor.__path__, "ossensor_vsensor.")]


@pytest.mark.parametrize("module", MODULES)
def test_imports_with_warnings_as_errors(module):
    done = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
