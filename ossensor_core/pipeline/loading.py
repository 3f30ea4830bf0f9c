"""Loading plugins: stevedore decides which entry points load, pluggy is how we call them.

Three entry point groups (``ossensor_core.plugin``): the capture backend and the transport are
"exactly one" stages chosen by name; ``ossensor.plugins`` holds the ordered extras of
``OSSENSOR_PLUGINS``. A name that matches nothing, matches two distributions, or fails to import
stops start-up with a PluginError naming it, the cause, and what is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from stevedore import DriverManager, NamedExtensionManager
from stevedore.exception import NoMatches

from ossensor_core import hookspecs
from ossensor_core.errors import PluginError
from ossensor_core.hookspecs import PROJECT
from ossensor_core.pipeline import legacy
from ossensor_core.hookspecs import CAPTURE_GROUP, PLUGIN_GROUP, TRANSPORT_GROUP

log = logging.getLogger(__name__)

#: Antigena, the response stage: loaded by default while ``ANTIGENA_ENABLED`` is true.
ANTIGENA_GROUP = "ossensor.antigena"
ANTIGENA = "antigena"

GROUPS = {CAPTURE_GROUP: "capture", TRANSPORT_GROUP: "transport", PLUGIN_GROUP: "plugin",
          ANTIGENA_GROUP: "antigena"}


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin, as ``ossensor plugins`` shows it."""

    name: str
    group: str
    target: str
    distribution: str | None
    version: str | None

    @property
    def stage(self) -> str:
        return GROUPS.get(self.group, self.group)


def installed_plugins(group: str) -> list[PluginInfo]:
    """Every entry point of ``group`` (without importing it), sorted by name."""
    found = []
    for entry_point in metadata.entry_points(group=group):
        dist = entry_point.dist  # None for an entry point made by hand
        found.append(PluginInfo(entry_point.name, group, entry_point.value,
                                dist.metadata["Name"] if dist else None,
                                dist.version if dist else None))
    return sorted(found, key=lambda p: (p.name, p.target))


def _available(group: str) -> str:
    names = sorted({p.name for p in installed_plugins(group)})
    return ", ".join(names) if names else "none"


def _describe(info: PluginInfo) -> str:
    where = f"{info.distribution} {info.version}" if info.distribution else "unknown distribution"
    return f"{info.target} ({where})"


def _raise_on_conflict(namespace: str, name: str, extensions: list[Any]) -> Any:
    targets = ", ".join(e.entry_point.value for e in extensions)
    raise PluginError(f"{GROUPS.get(namespace, namespace)} plugin {name!r} is provided by more "
                      f"than one installed package ({targets}); uninstall one of them")


def _raise_on_load_failure(manager: Any, entry_point: Any, exc: BaseException) -> None:
    raise PluginError(
        f"{GROUPS.get(manager.namespace, manager.namespace)} plugin {entry_point.name!r} "
        f"({entry_point.value}) failed to load: {type(exc).__name__}: {exc}"
    ) from exc


def _check_duplicates(group: str, names: Sequence[str]) -> None:
    by_name: dict[str, list[PluginInfo]] = {}
    for info in installed_plugins(group):
        by_name.setdefault(info.name, []).append(info)
    for name in names:
        providers = by_name.get(name, [])
        if len({(p.target, p.distribution) for p in providers}) > 1:
            raise PluginError(
                f"{GROUPS[group]} plugin {name!r} is provided by more than one installed package: "
                + "; ".join(_describe(p) for p in providers) + ". Uninstall one of them."
            )


def load_one(group: str, name: str, variable: str) -> tuple[str, Any]:
    """Load the single plugin ``name`` of ``group`` (an "exactly one" stage)."""
    if not name:
        raise PluginError(f"{variable} is empty; available: {_available(group)}")
    _check_duplicates(group, [name])
    try:
        driver = DriverManager(group, name, on_load_failure_callback=_raise_on_load_failure,
                               on_missing_entrypoints_callback=None,
                               conflict_resolver=_raise_on_conflict)
    except NoMatches:
        raise PluginError(f"{variable}={name}: no such {GROUPS[group]} plugin is installed; "
                          f"available: {_available(group)}") from None
    return name, driver.driver


def load_many(group: str, names: Sequence[str], variable: str) -> list[tuple[str, Any]]:
    """Load the plugins ``names`` of ``group``, in that order."""
    if not names:
        return []
    known = {p.name for p in installed_plugins(group)}
    missing = [n for n in names if n not in known]
    if missing:
        raise PluginError(f"{variable}: no plugin named {', '.join(map(repr, missing))} is "
                          f"installed; available: {_available(group)}")
    _check_duplicates(group, names)
    manager = NamedExtensionManager(group, list(names), name_order=True,
                                    on_load_failure_callback=_raise_on_load_failure,
                                    on_missing_entrypoints_callback=None,
                                    conflict_resolver=_raise_on_conflict)
    return [(ext.name, ext.plugin) for ext in manager.extensions]


@dataclass
class LoadedPlugins:
    """The plugin manager and what was loaded into it, in order."""

    manager: pluggy.PluginManager
    loaded: list[tuple[str, str]] = field(default_factory=list)  # (group, name)

    @property
    def hook(self) -> Any:
        return self.manager.hook


def new_plugin_manager(trace: bool = False) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    legacy.register(manager)  # objects of the old structural contracts, adapted once
    if trace:
        manager.trace.root.setwriter(lambda message: log.warning("hook trace: %s", message.rstrip()))
        manager.enable_tracing()
    return manager


def load_plugins(capture: str, transport: str, extras: Sequence[str],
                 disabled: Sequence[str], trace: bool = False,
                 antigena: bool = False) -> LoadedPlugins:
    """Load the capture backend, the transport, Antigena (when ``antigena`` and not disabled),
    then the extras minus the disabled ones.

    The core's own defaults are registered first, with lower priority than any plugin.
    """
    from ossensor_core.pipeline import defaults

    installed = {p.name for g in GROUPS for p in installed_plugins(g)} | {"core"}
    unknown = [n for n in disabled if n not in installed]
    if unknown:
        raise PluginError(f"OSSENSOR_DISABLE_PLUGINS: no plugin named "
                          f"{', '.join(map(repr, unknown))} is installed; available: "
                          f"{', '.join(sorted(installed))}")
    for name, variable in ((capture, "OSSENSOR_CAPTURE_BACKEND"), (transport, "OSSENSOR_TRANSPORT")):
        if name in disabled:
            raise PluginError(f"{variable}={name} is also listed in OSSENSOR_DISABLE_PLUGINS; "
                              "a sensor needs a capture backend and a transport")

    manager = new_plugin_manager(trace)
    loaded = LoadedPlugins(manager)
    if "core" not in disabled:
        manager.register(defaults, name="core")
        loaded.loaded.append(("core", "core"))
    chosen = [(CAPTURE_GROUP, *load_one(CAPTURE_GROUP, capture, "OSSENSOR_CAPTURE_BACKEND")),
              (TRANSPORT_GROUP, *load_one(TRANSPORT_GROUP, transport, "OSSENSOR_TRANSPORT"))]
    if antigena and ANTIGENA not in disabled:
        chosen.append((ANTIGENA_GROUP, *load_one(ANTIGENA_GROUP, ANTIGENA, "ANTIGENA_ENABLED")))
    wanted = [n for n in extras if n not in disabled]
    chosen += [(PLUGIN_GROUP, name, plugin)
               for name, plugin in load_many(PLUGIN_GROUP, wanted, "OSSENSOR_PLUGINS")]
    for group, name, plugin in chosen:
        register_name = f"{GROUPS[group]}:{name}"
        try:
            manager.register(plugin, name=register_name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"{GROUPS[group]} plugin {name!r} cannot be registered: {exc}") \
                from exc
        loaded.loaded.append((GROUPS[group], name))
    return loaded
