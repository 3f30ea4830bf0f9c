"""``ossensor diagnose``: why a sensor that runs sees nothing, answered from inside the sensor.

It reads the same environment as the sensor and checks each step in order: configuration,
interfaces, privileges, the kernel, the vSensor, Antigena. Every check has a stable id, a status
(``ok``, ``warning``, ``fail``, or ``skip`` when an earlier failure makes it meaningless), the
figure it measured and, when it did not pass, what to do. It needs nothing beyond the sensor's
own dependencies: netlink through pyroute2, ethtool through an ioctl, TLS through :mod:`ssl`,
HTTP through aiohttp. The HMAC key is used for signing only and never appears in the output
(:func:`render` masks it even should a message quote it).

Talking to the vSensor changes nothing there beyond what a sensor start does: the registration
is the one the sensor would send, and the test chunk is verified and acknowledged but not stored.
See ``docs/diagnose.md`` for every check id.

The core checks what it owns (:mod:`.configuration`, :mod:`.host`); the plugins check what they
own through the ``ossensor_diagnose`` hook (the https transport: the path to the vSensor, in
``ossensor_plugins.transport_https.diagnose``), as pytest's report hooks collect from every
plugin. :mod:`.network` has the helpers for checks that talk to a server, :mod:`.report` the
output.
"""

from __future__ import annotations

from collections.abc import Mapping

from .checks import Check, Context, Status, ok, skip
from .configuration import config_checks
from .host import (CAPABILITIES, effective_capabilities, filter_check, interface_checks,
                   kernel_checks, needed_capabilities, offloads, privilege_checks)
from .network import (certificate_text, connect_error, describe_certificate, fingerprint_text,
                      getaddrinfo, tls_action)
from .report import exit_code, render

__all__ = [
    "CAPABILITIES", "VSENSOR_CHECKS", "Check", "Context", "Status", "certificate_text",
    "config_checks", "connect_error", "describe_certificate", "diagnose",
    "effective_capabilities", "exit_code", "filter_check", "fingerprint_text", "getaddrinfo",
    "interface_checks", "kernel_checks", "needed_capabilities", "offloads", "ok",
    "plugin_checks", "privilege_checks", "render", "run_diagnose", "skip", "tls_action",
]

#: The checks of the path to the vSensor, in order (``docs/diagnose.md``). The plugin that talks
#: to the vSensor (the https transport) returns them from ``ossensor_diagnose``; without such a
#: plugin they are listed as skipped, so that the report always has the same lines.
VSENSOR_CHECKS = ("vsensor.dns", "vsensor.tcp", "vsensor.tls", "vsensor.clock",
                  "vsensor.register", "vsensor.filter", "vsensor.test_chunk",
                  "antigena.websocket")


def plugin_checks(ctx: Context) -> list[Check]:
    """Every plugin's checks (``ossensor_diagnose``), in the order the plugins were loaded."""
    config, plugins = ctx.config, ctx.plugins
    assert config is not None
    if plugins is None:
        return [skip(i, "the plugins did not load (see config.plugins)") for i in VSENSOR_CHECKS]
    found: list[Check] = []
    for result in reversed(plugins.hook.ossensor_diagnose(config=config, context=ctx)):
        found.extend(result)
    if not any(check.id in VSENSOR_CHECKS for check in found):
        found += [skip(i, f"OSSENSOR_TRANSPORT={config.transport} does not talk to a vSensor")
                  for i in VSENSOR_CHECKS]
    return found


def diagnose(environ: Mapping[str, str]) -> list[Check]:
    """Every check, in order."""
    ctx = Context()
    checks = config_checks(environ, ctx)
    checks += interface_checks(ctx)
    checks += privilege_checks(ctx)
    checks += kernel_checks(ctx)
    checks += plugin_checks(ctx)
    return checks


def run_diagnose(environ: Mapping[str, str], as_json: bool) -> tuple[str, int]:
    """The report and the exit code, for the CLI."""
    checks = diagnose(environ)
    key = environ.get("VSENSOR_HMAC_KEY", "")
    return render(checks, as_json, key), exit_code(checks)
