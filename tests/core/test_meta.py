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


# -- the shape of the code (issue 14) --------------------------------------------------------

import ast  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import ossensor_vsensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ossensor_core, ossensor_plugins, ossensor_vsensor)
MAX_LINES = 500

#: ``getattr(`` / ``hasattr(`` / ``except AttributeError`` that are not plugin probing: file ->
#: (text on the line, why it is not probing a plugin object).
NOT_PROBING = {
    "ossensor_core/node/patterns.py": [
        ('getattr(self, "_buffer", None)', "__del__ of an object whose __init__ may have failed")],
    "ossensor_core/node/interfaces.py": [
        ('hasattr(message, "get")', "pyroute2 messages and the plain dicts of the tests")],
    "ossensor_core/ops/cli.py": [
        ("obj = getattr(obj, part)", "resolving an entry point's dotted target (module:attr)"),
        ('hasattr(getattr(obj, name), "ossensor_impl")',
         "`ossensor plugins` lists the hook implementations, as pluggy finds them"),
        ('getattr(obj, "ossensor_settings", None)',
         "`ossensor plugins` shows a plugin's settings without registering it")],
    "ossensor_core/runtime/memory.py": [
        ("except (OSError, AttributeError, TypeError):",
         "a C library without mallopt or malloc_trim")],
    "ossensor_core/runtime/threads.py": [
        ("except (OSError, AttributeError):", "a C library without prctl")],
    "plugins/capture_afpacket/__init__.py": [
        ("except (OSError, AttributeError):", "a libatomic without atomic_thread_fence")],
    "ossensor_core/ops/diagnose/network.py": [
        ('getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)',
         "CPython's certificate decoder, absent on other builds")],
}

#: Leaf modules that any folder of ``ossensor_core`` may import; not counted as folder edges.
LEAVES = {"ossensor_core.wire.names", "ossensor_core.errors"}


def source_files() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        root = Path(package.__path__[0])
        for path in sorted(root.rglob("*.py")):
            parts = [package.__name__, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def repository_path(path: Path) -> str:
    """``path`` relative to the repository (packages may be reached through symlinks)."""
    for package, folder in ((ossensor_core, "ossensor_core"), (ossensor_plugins, "plugins"),
                            (ossensor_vsensor, "vsensor/ossensor_vsensor")):
        root = Path(package.__path__[0])
        if path.is_relative_to(root):
            return f"{folder}/{path.relative_to(root).as_posix()}"
    raise AssertionError(path)


def imported(module: str, path: Path, known: dict[str, Path], top_level_only: bool) -> set[str]:
    """The modules of ``known`` that ``module`` imports: at module level only (not under ``if
    TYPE_CHECKING``, not inside functions), or anywhere."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            elif top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])

    visit(ast.parse(path.read_text()).body)
    found.discard(module)
    return found


def import_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    known = source_files()
    return {m: imported(m, p, known, top_level_only) for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_module_is_over_500_lines():
    long = {m: n for m, p in source_files().items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_cycles_among_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycles_among_the_core_folders():
    """Folders depend one way (e.g. ops -> pipeline -> capture -> wire), so each can be read
    without the ones above it."""
    def folder(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        if module.startswith("ossensor_core.") and module not in LEAVES:
            graph.setdefault(folder(module), set()).update(
                folder(t) for t in targets
                if t.startswith("ossensor_core.") and t not in LEAVES and folder(t) != folder(module))
    assert cycles(graph) == []


def test_no_attribute_probing():
    """No ``getattr``/``hasattr``/``except AttributeError`` on plugin objects: a contract
    declares every member that is read (``pipeline/contracts.py``)."""
    pattern = re.compile(r"\bgetattr\(|\bhasattr\(|except[ (]+.*\bAttributeError\b")
    unexplained = []
    used = set()
    for path in source_files().values():
        name = repository_path(path)
        allowed = [text for text, _ in NOT_PROBING.get(name, [])]
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not pattern.search(line):
                continue
            matches = [text for text in allowed if text in line]
            used.update((name, text) for text in matches)
            if not matches:
                unexplained.append(f"{name}:{number}: {line.strip()}")
    assert unexplained == []
    listed = {(name, text) for name, entries in NOT_PROBING.items() for text, _ in entries}
    assert listed <= used, f"allowed but not found any more: {listed - used}"


def test_built_in_plugins_never_import_another_plugin():
    found = set()
    for module, targets in import_graph(top_level_only=False).items():
        parts = module.split(".")
        if parts[0] != "ossensor_plugins" or len(parts) < 2:
            continue
        for target in targets:
            other = target.split(".")
            if other[0] == "ossensor_plugins" and len(other) > 1 and other[1] != parts[1]:
                found.add((parts[1], other[1]))
    assert found == set(), found


def test_the_example_package_imports_only_the_plugin_facade():
    """Its package imports only ``ossensor_core.plugin`` of the core; its tests also
    ``ossensor_core.testing``."""
    example = ROOT / "examples" / "ossensor-pcapfile"
    for path, allowed in [*((p, {"ossensor_core.plugin"})
                            for p in (example / "src").rglob("*.py")),
                          *((p, {"ossensor_core.plugin", "ossensor_core.testing"})
                            for p in (example / "tests").rglob("*.py"))]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
        core = {n for n in names if n.split(".")[0] == "ossensor_core"}
        assert core <= allowed, f"{path.relative_to(ROOT)} imports {sorted(core - allowed)}"


def test_every_package_folder_is_listed_in_pyproject():
    """The image installs without ``-e``: a folder missing from ``packages`` would be missing
    there while every editable test passes."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts).replace("plugins", "ossensor_plugins", 1)
             for top in ("ossensor_core", "plugins") for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed
