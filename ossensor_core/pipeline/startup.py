"""Start-up: read the environment, load plugins, select interfaces, compile filters.

Everything that can be checked before capturing is checked here, and every problem is reported
together in one ConfigError, so a user fixes a deployment in one round.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ossensor_core.capture.bpf import BpfProgram, combine_filters, compile_filter
from ossensor_core.wire.names import LINKTYPE_ETHERNET
from ossensor_core.pipeline.config import (SensorConfig, connection_settings, read_core_config,
                                          write_config_file)
from ossensor_core.node.patterns import PatternError
from ossensor_core.errors import ConfigError, FilterError, InterfaceError, PluginError
from ossensor_core.node.interfaces import (Decision, Interface, InterfaceSelector, Primary, list_interfaces,
                         primary_interface)
from ossensor_core.node.placement import Plan, Rules, plan, read_node_view
from ossensor_core.pipeline.loading import LoadedPlugins, load_plugins
from ossensor_core.pipeline.settings import PluginSettings, SettingsGroup, resolve_settings

log = logging.getLogger("ossensor.startup")


@dataclass
class Prepared:
    """A configuration that passed every check, with what start-up found."""

    config: SensorConfig
    plugins: LoadedPlugins
    selector: InterfaceSelector
    interfaces: list[Interface]
    decisions: list[Decision]
    primary: Primary
    kernel_filter: str
    #: The single-copy rules of every interface at start-up (empty when they are off).
    placement: Plan = field(default_factory=Plan)

    def decide(self, interface: Interface) -> Decision:
        """The decision for an interface that appears later: same rules, same plugins."""
        return decide(self.plugins, self.config, self.selector, interface)

    @property
    def selected(self) -> list[Interface]:
        return [d.interface for d in self.decisions if d.selected]

    def program(self, linktype: int) -> BpfProgram:
        """The kernel filter compiled for ``linktype`` (cached; checked against the limit)."""
        program = compile_filter(self.kernel_filter, linktype)
        program.check_kernel_limit()
        return program


def plugin_settings(plugins: LoadedPlugins, environ: Mapping[str, str],
                    problems: list[str]) -> dict[str, PluginSettings]:
    """Collect the core's vSensor connection settings and every plugin's declared settings, and
    read them from ``environ``. The connection settings are the core's whatever is loaded or
    disabled: the transport, Antigena and diagnose all connect to the vSensor."""
    found: dict[str, PluginSettings] = {}
    for group in [connection_settings(), *plugins.hook.ossensor_settings()]:
        if not isinstance(group, SettingsGroup):
            problems.append(f"a plugin's ossensor_settings returned {type(group).__name__}, "
                            "not a SettingsGroup")
            continue
        resolved = resolve_settings(group.settings, environ, group.plugin, problems)
        found[group.plugin] = PluginSettings(group.plugin, resolved)
    return found


def _configure(plugins: LoadedPlugins, config: SensorConfig, problems: list[str]) -> None:
    # Each implementation separately, so that every plugin's problems are reported together.
    for impl in plugins.hook.ossensor_configure.get_hookimpls():
        if config.trace_hooks:  # called one by one, so pluggy's tracing does not see it
            log.warning("hook trace: ossensor_configure [hook] of %s", impl.plugin_name)
        try:
            impl.function(config=config)
        except ConfigError as exc:
            if config.trace_hooks:
                log.warning("hook trace: ossensor_configure of %s refused: %s",
                            impl.plugin_name, "; ".join(exc.problems))
            problems.extend(exc.problems)


def decide(plugins: LoadedPlugins, config: SensorConfig, selector: InterfaceSelector,
           interface: Interface) -> Decision:
    """The core's decision for one interface, unless a discovery plugin overrides it."""
    decision = selector.decide(interface)
    override = plugins.hook.ossensor_interface_decision(config=config, interface=interface,
                                                        decision=decision)
    return override if override is not None else decision


def kernel_filter(plugins: LoadedPlugins, config: SensorConfig) -> str:
    parts = [p for p in plugins.hook.ossensor_kernel_filter(config=config) if p]
    return combine_filters(*parts, config.bpf)


def prepare(environ: Mapping[str, str], *, write_config: bool = True) -> Prepared:
    """Check everything that can be checked before capturing; raise ConfigError listing all."""
    config, problems = read_core_config(environ)
    try:
        plugins = load_plugins(config.capture_backend, config.transport, config.plugins,
                               config.disabled_plugins,
                               trace=config.trace_hooks, antigena=config.antigena_enabled)
    except PluginError as exc:
        raise ConfigError([*problems, str(exc)]) from exc
    config = dataclasses.replace(config, plugin_settings=plugin_settings(plugins, environ,
                                                                         problems))
    _configure(plugins, config, problems)

    interfaces: list[Interface] = []
    decisions: list[Decision] = []
    primary = Primary(None, "not determined")
    selector: InterfaceSelector | None = None
    try:
        selector = InterfaceSelector(config.include_patterns, config.exclude_patterns,
                                     config.network_device)
    except PatternError:
        pass  # read_core_config reported it, naming the variable
    try:
        interfaces = list_interfaces()
    except InterfaceError as exc:
        problems.append(str(exc))
    if selector is not None:
        decisions = [decide(plugins, config, selector, i) for i in interfaces]
        selected = [d.interface for d in decisions if d.selected]
        names = {i.name for i in interfaces}
        if config.network_device and config.network_device not in names:
            problems.append(f"OSSENSOR_NETWORK_DEVICE: no interface named "
                            f"{config.network_device!r} (present: {', '.join(sorted(names))})")
        elif not selected and not config.device_any:
            lists = [config.settings[name].from_variable or name  # the (legacy) name given
                     for name in ("NETWORK_DEVICE_INCLUDELIST", "NETWORK_DEVICE_EXCLUDELIST")]
            problems.append(
                f"no interface to capture: check {lists[0]} and {lists[1]} (present: "
                f"{', '.join(i.name for i in interfaces)}), or set NETWORK_DEVICE_ANY=1 to wait "
                "for matching interfaces to appear")
        try:
            primary = primary_interface(interfaces, selected, config.network_device)
        except InterfaceError as exc:
            problems.append(str(exc))

    combined = ""
    if config.bpf:
        _check_filter("BPF", config.bpf, decisions, problems)
    try:
        combined = kernel_filter(plugins, config)
    except Exception as exc:  # a plugin hook failed; name the stage
        problems.append(f"a plugin's ossensor_kernel_filter failed: {exc}")
    if combined and combined != config.bpf and not problems:
        _check_filter("the kernel filter (BPF AND-ed with plugin filters)", combined, decisions,
                      problems)

    if not problems and write_config:
        try:
            write_config_file(config, [d.interface.name for d in decisions if d.selected])
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems or selector is None:
        raise ConfigError(problems)
    placement = Plan()
    if config.single_copy_active:
        try:
            placement = plan(read_node_view(), Rules(config.service_ranges, config.pod_copy,
                                                     config.keep_encapsulated))
        except InterfaceError as exc:  # the running sensor tries again at once
            log.warning("single copy: %s", exc)
    return Prepared(config, plugins, selector, interfaces, decisions, primary, combined,
                    placement)


def _check_filter(what: str, expression: str, decisions: list[Decision],
                  problems: list[str]) -> None:
    """Compile for every link type among the selected interfaces (Ethernet when none yet)."""
    linktypes = sorted({d.interface.linktype for d in decisions
                        if d.selected and d.interface.linktype is not None}) or [LINKTYPE_ETHERNET]
    for linktype in linktypes:
        try:
            compile_filter(expression, linktype).check_kernel_limit()
        except FilterError as exc:
            problems.append(f"{what}: {exc}")
            return


def single_copy_state(prepared: Prepared) -> dict[str, Any]:
    """Whether the single-copy rules are on, why not, and each interface's role."""
    config = prepared.config
    if not config.single_copy:
        why = "off (OSSENSOR_SINGLE_COPY=false): a packet seen on several interfaces is " \
              "stored once per interface"
    elif not config.every_interface:
        why = "off: they need every interface captured (NETWORK_DEVICE_ANY=1 without " \
              "OSSENSOR_NETWORK_DEVICE or include/exclude lists); a packet seen on several " \
              "captured interfaces is stored once per interface"
    else:
        why = "on: each interface keeps the copies no other one keeps"
    placements = prepared.placement.placements.values()
    return {"active": config.single_copy_active, "why": why,
            "interfaces": [{"interface": p.name, "role": p.role, "reason": p.reason,
                            "filter": p.expression} for p in placements],
            "unplaced": prepared.placement.notes()}


def describe(prepared: Prepared) -> dict[str, Any]:
    """The resolved configuration as ``ossensor check`` prints it. The key shows as ``***``."""
    config = prepared.config
    settings = {
        variable: {"value": resolved.shown(), "source": resolved.source,
                   **({"from": resolved.from_variable} if resolved.source == "legacy" else {})}
        for variable, resolved in sorted(config.all_settings().items())
    }
    return {
        "interfaces": [i.name for i in prepared.selected],
        "decisions": [{"interface": d.interface.name, "selected": d.selected, "reason": d.reason,
                       "up": d.interface.up} for d in prepared.decisions],
        "primary_interface": prepared.primary.name,
        "primary_interface_source": prepared.primary.how,
        "waiting_for_interfaces": not prepared.selected and config.device_any,
        "capture_backend": config.capture_backend,
        "transport": config.transport,
        "plugins": [name for stage, name in prepared.plugins.loaded if stage == "plugin"],
        "loaded": [{"stage": stage, "name": name} for stage, name in prepared.plugins.loaded],
        "bpf": config.bpf,
        "kernel_filter": prepared.kernel_filter,
        "single_copy": single_copy_state(prepared),
        "vsensor": config.vsensor_address,
        "config_path": str(config.config_path),
        "settings": settings,
    }
