"""Old import paths of modules that moved when the core was split into folders.

Third-party plugins written against the flat layout (``ossensor_core.batch``,
``ossensor_core.bpf``, ...) keep working: a finder on ``sys.meta_path`` answers each old name
with the module at its new place, and warns (``DeprecationWarning``) naming that place. New code
imports from ``ossensor_core.plugin``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: Old module (under ``ossensor_core.``) -> where it lives now.
MOVED = {
    "batch": "capture.batch",
    "bpf": "capture.bpf",
    "bpfgen": "capture.peer_exclusion",
    "ere": "node.patterns",
    "interfaces": "node.interfaces",
    "workloads": "node.workloads",
    "chunk": "wire.chunk",
    "pcapng": "wire.pcapng",
    "pcapng_files": "wire.rotating_pcapng",
    "protocol": "wire.signing",
    "antigena": "wire.antigena",
    "config": "pipeline.config",
    "settings": "pipeline.settings",
    "manager": "pipeline.loading",
    "startup": "pipeline.startup",
    "sensor": "pipeline.sensor",
    "protocols": "pipeline.contracts",
    "defaults": "pipeline.defaults",
    "cli": "ops.cli",
    "diagnose": "ops.diagnose",
    "health": "ops.health",
    "metrics": "ops.metrics",
    "logsetup": "runtime.logsetup",
    "memory": "runtime.memory",
    "threads": "runtime.threads",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.rpartition(".")
        if prefix != "ossensor_core" or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = "ossensor_core." + MOVED[spec.name.rpartition(".")[2]]
        # stacklevel 2 and importlib's own frames skipped: the warning names the import
        # statement of the plugin that needs updating.
        warnings.warn(f"{spec.name} has moved to {new}: import it from there, or from "
                      "ossensor_core.plugin", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # already executed under its new name


def install() -> None:
    """Answer the old names (once per process)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
