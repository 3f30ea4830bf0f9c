"""The ``ossensor`` command: run the sensor, or check, list plugins, watch interfaces."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import Any

from ossensor_core import __version__
from ossensor_core.pipeline.config import read_core_config
from ossensor_core.errors import ConfigError, OssensorError
from ossensor_core.node.interfaces import InterfaceSelector, InterfaceWatch, list_interfaces
from ossensor_core.pipeline.loading import GROUPS, installed_plugins
from ossensor_core.pipeline.settings import SettingsGroup


def _fail(problems: Sequence[str]) -> int:
    """One line per problem on stderr (each names its variable), exit status 1: what an operator
    and a log collector read, never a traceback."""
    for problem in problems:
        print(f"ossensor: cannot start: {' '.join(problem.split(chr(10)))}", file=sys.stderr)
    return 1


def cmd_check(environ: Mapping[str, str]) -> int:
    from ossensor_core.pipeline.startup import describe, prepare

    try:
        prepared = prepare(environ)
    except ConfigError as exc:
        return _fail(exc.problems)
    json.dump(describe(prepared), sys.stdout, indent=2)
    print()
    return 0


def _plugin_entry(info: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": info.name, "target": info.target,
                             "distribution": info.distribution, "version": info.version}
    try:
        module = import_module(info.target.split(":")[0])
        obj = module
        if ":" in info.target:
            for part in info.target.split(":")[1].split("."):
                obj = getattr(obj, part)
    except Exception as exc:  # report, do not hide: the listing must show broken plugins
        entry["error"] = f"{type(exc).__name__}: {exc}"
        return entry
    entry["hooks"] = sorted(name for name in dir(obj) if name.startswith("ossensor_")
                            and hasattr(getattr(obj, name), "ossensor_impl"))
    settings: list[dict[str, Any]] = []
    declare = getattr(obj, "ossensor_settings", None)
    group = declare() if callable(declare) else None
    if isinstance(group, SettingsGroup):
        settings = [{"variable": s.variable(group.plugin), "type": s.type.__name__,
                     "default": s.default, "description": s.description}
                    for s in group.settings]
    entry["settings"] = settings
    return entry


def cmd_plugins() -> int:
    listing = {stage: [_plugin_entry(info) for info in installed_plugins(group)]
               for group, stage in GROUPS.items()}
    json.dump(listing, sys.stdout, indent=2)
    print()
    return 0


def cmd_interfaces(environ: Mapping[str, str], watch: float | None) -> int:
    config, problems = read_core_config(environ)
    pattern_problems = [p for p in problems if p.startswith("NETWORK_DEVICE_")]
    if pattern_problems:
        return _fail(pattern_problems)
    selector = InterfaceSelector(config.include_patterns, config.exclude_patterns,
                                 config.network_device)
    interfaces = list_interfaces()
    for interface in interfaces:
        decision = selector.decide(interface)
        print(json.dumps({"interface": interface.name, "index": interface.index,
                          "selected": decision.selected, "reason": decision.reason,
                          "up": interface.up, "linktype": interface.linktype}), flush=True)
    if watch is None:
        return 0

    async def follow() -> None:
        watcher = InterfaceWatch(selector.decide, config.device_any, interfaces)
        start = time.monotonic()
        async for event in watcher.events():
            print(json.dumps({"event": event.kind, "interface": event.interface.name,
                              "index": event.interface.index,
                              "elapsed": round(time.monotonic() - start, 3)}), flush=True)

    try:
        asyncio.run(asyncio.wait_for(follow(), watch))
    except TimeoutError:
        pass
    return 0


def cmd_run(environ: Mapping[str, str]) -> int:
    from ossensor_core.ops.run import run_sensor
    from ossensor_core.runtime.heap import snapshots_on_signal
    from ossensor_core.runtime.logsetup import setup_logging
    from ossensor_core.runtime.memory import keep_buffers_mapped
    from ossensor_core.pipeline.startup import prepare

    snapshots_on_signal(environ)  # diagnosis only: off unless OSSENSOR_TRACEMALLOC is set
    try:
        prepared = prepare(environ)
    except ConfigError as exc:
        return _fail(exc.problems)
    config = prepared.config
    try:
        setup_logging(config.debug, config.logfile, [config.hmac_key])
    except OSError as exc:
        return _fail([f"OSSENSOR_LOGFILE_PATH: cannot open {config.logfile!r}: {exc.strerror}"])
    keep_buffers_mapped()
    try:
        asyncio.run(run_sensor(prepared))
    except OssensorError as exc:
        return _fail([str(exc)])
    return 0


def cmd_diagnose(environ: Mapping[str, str], as_json: bool) -> int:
    from ossensor_core.ops.diagnose import run_diagnose

    report, code = run_diagnose(environ, as_json)
    print(report, flush=True)
    return code


def cmd_health(environ: Mapping[str, str], live: bool, max_age: float) -> int:
    from ossensor_core.ops.health import run_health

    code, message = run_health(environ, live, max_age)
    print(message, file=sys.stdout if code == 0 else sys.stderr, flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ossensor",
        description="Network traffic sensor. Configured by environment variables; see "
                    "`ossensor check` for what it would do.")
    parser.add_argument("--version", action="version", version=f"ossensor {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the sensor (the default)")
    sub.add_parser("check", help="validate the environment and print the resolved "
                                 "configuration as JSON")
    sub.add_parser("plugins", help="list installed plugins by stage, as JSON")
    interfaces = sub.add_parser("interfaces", help="show the capture decision for each "
                                                   "interface, as JSON lines")
    interfaces.add_argument("--watch", type=float, metavar="SECONDS",
                            help="then report interface events for this long")
    diagnose = sub.add_parser("diagnose", help="check configuration, interfaces, privileges, "
                                               "kernel, vSensor and Antigena, one line each")
    diagnose.add_argument("--json", action="store_true", help="print the checks as JSON")
    health = sub.add_parser("health", help="probe a running sensor: exit 0 when ready "
                                           "(registered and capturing)")
    health.add_argument("--live", action="store_true",
                        help="only check that the sensor is alive and making progress")
    health.add_argument("--max-age", type=float, default=30.0, metavar="SECONDS",
                        help="oldest acceptable status (default 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # As PID 1 in a container, SIGTERM has no default action: make it stop us like SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    environ = dict(os.environ)
    try:
        if args.command == "check":
            return cmd_check(environ)
        if args.command == "plugins":
            return cmd_plugins()
        if args.command == "interfaces":
            return cmd_interfaces(environ, args.watch)
        if args.command == "diagnose":
            return cmd_diagnose(environ, args.json)
        if args.command == "health":
            return cmd_health(environ, args.live, args.max_age)
        return cmd_run(environ)
    except KeyboardInterrupt:
        return 130 if args.command in ("check", "plugins", "diagnose", "health") else 0


if __name__ == "__main__":
    sys.exit(main())
