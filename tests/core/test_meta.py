"""Every module imports cleanly on its own with warnings as errors; every hook is documented."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import ossensor_core
import ossensor_plugins
from ossensor_core import hookspecs


def modules() -> list[str]:
    found = []
    for package in (ossensor_core, ossensor_plugins):
        found.append(package.__name__)
        found += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(found)


@pytest.mark.parametrize("module", modules())
def test_imports_with_warnings_as_errors(module):
    done = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_hook_is_documented_in_the_architecture_page():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("ossensor_")]
    assert len(hooks) >= 13
    for name in hooks:
        assert f"`{name}" in page, f"{name} is not in docs/architecture.md"
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


def test_every_hook_is_documented_for_plugin_authors_and_exercised_by_a_test():
    """docs/plugins.md has a row per hook; some test implements (``def name(``) or calls
    (``.name(``) each hook outside the testing kit's own plumbing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "plugins.md").read_text()
    tests = "\n".join(p.read_text() for p in (root / "tests").rglob("*.py"))
    for name in (n for n in dir(hookspecs) if n.startswith("ossensor_")):
        assert re.search(rf"^\| `{name}` \|", page, re.M), f"{name} has no row in docs/plugins.md"
        assert re.search(rf"(def |\.){name}\(", tests), f"no test implements or calls {name}"
