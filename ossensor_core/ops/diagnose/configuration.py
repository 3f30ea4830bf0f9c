"""The configuration checks: every variable with its value and source, and the plugins."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ossensor_core.errors import PluginError
from ossensor_core.pipeline.config import read_core_config
from ossensor_core.pipeline.loading import load_plugins
from ossensor_core.pipeline.settings import ResolvedSetting
from ossensor_core.pipeline.startup import _configure, kernel_filter, plugin_settings

from .checks import Check, Context, ok


def _describe_source(resolved: ResolvedSetting) -> str:
    if resolved.source == "legacy":
        return f"from the legacy name {resolved.from_variable}; rename it to {resolved.variable}"
    if resolved.source == "variable":
        return "from the variable"
    return "default"


def config_checks(environ: Mapping[str, str], ctx: Context) -> list[Check]:
    """Parse the environment as start-up does, keeping going after problems so that every
    variable is reported; each problem lands on the check of the variable it names."""
    config, problems = read_core_config(environ)
    checks: list[Check] = []
    try:
        plugins = load_plugins(config.capture_backend, config.transport, config.plugins,
                               config.disabled_plugins)
    except PluginError as exc:
        checks.append(Check("config.plugins", "fail", str(exc),
                            "install the plugin or fix OSSENSOR_CAPTURE_BACKEND, "
                            "OSSENSOR_TRANSPORT, OSSENSOR_PLUGINS (see `ossensor plugins`)"))
        plugins = None
    else:
        config = dataclasses.replace(config, plugin_settings=plugin_settings(plugins, environ,
                                                                             problems))
        _configure(plugins, config, problems)
        names = ", ".join(name if stage == name else f"{stage} {name}"
                          for stage, name in plugins.loaded)
        checks.append(ok("config.plugins", f"loaded: {names}",
                          loaded=[{"stage": s, "name": n} for s, n in plugins.loaded]))
        try:
            ctx.kernel_filter = kernel_filter(plugins, config)
        except Exception as exc:  # a plugin hook failed: report it, do not stop diagnosing
            problems.append(f"a plugin's ossensor_kernel_filter failed: {exc}")
    ctx.config, ctx.plugins = config, plugins

    by_variable: dict[str, list[str]] = {}
    settings = config.all_settings()
    names_of = {name: r for r in settings.values() for name in (r.variable, r.from_variable)
                if name}
    unassigned: list[str] = []
    for problem in problems:
        owner = max((n for n in names_of if problem.startswith(n)), key=len, default=None)
        if owner is None:
            unassigned.append(problem)
        else:
            by_variable.setdefault(names_of[owner].variable, []).append(problem)
    for variable, resolved in settings.items():
        shown = resolved.shown()
        figure = f"{variable}={shown!r} ({_describe_source(resolved)})"
        data = {"variable": variable, "value": shown, "source": resolved.source,
                "from": resolved.from_variable}
        found = by_variable.get(variable)
        if found:
            ctx.bad_variables.add(variable)
            checks.append(Check(f"config.{variable}", "fail", "; ".join(found),
                                f"fix {variable} (`ossensor check` shows the same problems)",
                                data))
        else:
            checks.append(Check(f"config.{variable}", "ok", figure, data=data))
    if unassigned:
        checks.append(Check("config.other", "fail", "; ".join(unassigned),
                            "fix the configuration as the message says"))
    return checks
