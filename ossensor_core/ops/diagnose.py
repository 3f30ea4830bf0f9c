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
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from ossensor_core import __version__
from ossensor_core.capture.bpf import BPF_MAXINSNS, LINKTYPE_ETHERNET, SNAPLEN, combine_filters, compile_filter
from ossensor_core.wire.chunk import ChunkCodec
from ossensor_core.pipeline.config import SensorConfig, read_core_config
from ossensor_core.node.patterns import PatternError
from ossensor_core.errors import FilterError, InterfaceError, PluginError, TransportError
from ossensor_core.node.interfaces import (Decision, Interface, InterfaceSelector, Primary, list_interfaces,
                         primary_interface)
from ossensor_core.pipeline.loading import LoadedPlugins, load_plugins
from ossensor_core.wire.signing import (DEFAULT_SKEW_SECONDS, H_VERSION, PATH_ANTIGENA, PATH_CHUNKS,
                       PATH_REGISTER, PROTOCOL_VERSIONS, sign)
from ossensor_core.pipeline.contracts import Chunk
from ossensor_core.pipeline.settings import ResolvedSetting
from ossensor_core.pipeline.startup import _configure, decide, kernel_filter, plugin_settings

Status = Literal["ok", "warning", "fail", "skip"]

#: Every answer of the vSensor carries its clock in this header (``docs/protocol.md``).
H_SERVER_TIME = "X-Ossensor-Server-Time"
H_TEST = "X-Ossensor-Test"
H_SEQUENCE = "X-Ossensor-Chunk-Sequence"
#: A clock this far from the vSensor's works but is drifting: worth fixing before it fails.
CLOCK_WARNING_SECONDS = 30.0
#: A certificate that expires within this many days gets a warning.
EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Check:
    """One line of the report: ``figure`` is what was measured, ``action`` what to do."""

    id: str
    status: Status
    figure: str
    action: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "figure": self.figure,
                "action": self.action, "data": dict(self.data)}


def _ok(check_id: str, figure: str, **data: Any) -> Check:
    return Check(check_id, "ok", figure, data=data)


def _skip(check_id: str, why: str) -> Check:
    return Check(check_id, "skip", why)


# -- configuration ---------------------------------------------------------------------------


@dataclass
class Context:
    """What the checks found so far and later checks build on."""

    config: SensorConfig | None = None
    plugins: LoadedPlugins | None = None
    interfaces: list[Interface] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    primary: Primary = Primary(None, "not determined")
    kernel_filter: str | None = None
    #: Variables whose value is invalid (their checks failed).
    bad_variables: set[str] = field(default_factory=set)

    @property
    def selected(self) -> list[Interface]:
        return [d.interface for d in self.decisions if d.selected]

    def linktypes(self) -> list[int]:
        """The link types the filter must compile for (Ethernet when nothing is selected)."""
        return sorted({i.linktype for i in self.selected if i.linktype is not None}) \
            or [LINKTYPE_ETHERNET]


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
        checks.append(_ok("config.plugins", f"loaded: {names}",
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


# -- interfaces ------------------------------------------------------------------------------


def interface_checks(ctx: Context) -> list[Check]:
    """Every interface with its decision and reason, what is captured, and the primary one."""
    config = ctx.config
    assert config is not None
    try:
        selector = InterfaceSelector(config.include_patterns, config.exclude_patterns,
                                     config.network_device)
    except PatternError:
        return [_skip("interfaces.selected", "an include or exclude pattern is invalid "
                                             "(see config.NETWORK_DEVICE_*)")]
    try:
        ctx.interfaces = list_interfaces()
    except InterfaceError as exc:
        return [Check("interfaces.selected", "fail", str(exc),
                      "the sensor needs netlink access to its network namespace")]
    checks: list[Check] = []
    for interface in ctx.interfaces:
        if ctx.plugins is not None:
            decision = decide(ctx.plugins, config, selector, interface)
        else:
            decision = selector.decide(interface)
        ctx.decisions.append(decision)
        state = "up" if interface.up else "down"
        linktype = interface.linktype
        kind = f" {interface.kind}" if interface.kind else ""
        figure = (f"{'captured' if decision.selected else 'not captured'}: {decision.reason}; "
                  f"{state}; ARPHRD {interface.arphrd}{kind}, link type "
                  f"{linktype if linktype is not None else 'none'}")
        data = {"interface": interface.name, "index": interface.index,
                "selected": decision.selected, "reason": decision.reason, "up": interface.up,
                "arphrd": interface.arphrd, "linktype": linktype, "kind": interface.kind,
                "addresses": list(interface.addresses)}
        if decision.selected and not interface.up:
            checks.append(Check(f"interfaces.{interface.name}", "warning", figure,
                                "the interface is down: nothing arrives until it comes up",
                                data))
        else:
            checks.append(Check(f"interfaces.{interface.name}", "ok", figure, data=data))

    names = [i.name for i in ctx.interfaces]
    selected = [i.name for i in ctx.selected]
    if config.network_device and config.network_device not in names:
        checks.append(Check("interfaces.selected", "fail",
                            f"OSSENSOR_NETWORK_DEVICE={config.network_device!r} does not exist "
                            f"(present: {', '.join(names)})",
                            "name an existing interface, or unset OSSENSOR_NETWORK_DEVICE"))
    elif not selected:
        rules = (f"include {' '.join(config.include_patterns) or '(none)'}, "
                 f"exclude {' '.join(config.exclude_patterns) or '(none)'}")
        status: Status = "warning" if config.device_any else "fail"
        checks.append(Check("interfaces.selected", status,
                            f"no interface is captured ({rules}; present: {', '.join(names)})",
                            "fix NETWORK_DEVICE_INCLUDELIST / NETWORK_DEVICE_EXCLUDELIST"
                            + (" (NETWORK_DEVICE_ANY waits for a matching interface)"
                               if config.device_any else ""),
                            {"selected": []}))
    else:
        checks.append(_ok("interfaces.selected", f"capturing {', '.join(selected)}",
                          selected=selected))
    try:
        ctx.primary = primary_interface(ctx.interfaces, ctx.selected, config.network_device)
    except InterfaceError as exc:
        checks.append(Check("interfaces.primary", "warning", str(exc),
                            "the sensor identifies itself without a primary address"))
        return checks
    data = {"interface": ctx.primary.name, "how": ctx.primary.how}
    if ctx.primary.name is None:
        checks.append(Check("interfaces.primary", "warning", ctx.primary.how,
                            "add a default route or set OSSENSOR_NETWORK_DEVICE", data))
    else:
        checks.append(Check("interfaces.primary", "ok",
                            f"{ctx.primary.name} (found by: {ctx.primary.how})", data=data))
    return checks


# -- privileges ------------------------------------------------------------------------------

#: The capabilities that matter to a sensor (linux/capability.h bit numbers).
CAPABILITIES = {"NET_BIND_SERVICE": 10, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14,
                "SYS_ADMIN": 21}


def effective_capabilities(status_text: str | None = None) -> set[str]:
    """The names (of :data:`CAPABILITIES`) in the process's effective set, from
    ``/proc/self/status`` (no libcap needed)."""
    if status_text is None:
        status_text = Path("/proc/self/status").read_text()
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
            return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}
    return set()


def needed_capabilities(config: SensorConfig) -> tuple[set[str], set[str]]:
    """(needed, recommended): a packet socket needs NET_RAW (so do Antigena's TCP resets); the
    scapy backend's large receive buffer needs NET_ADMIN, else rmem_max caps it."""
    needed = {"NET_RAW"}
    recommended = {"NET_ADMIN"} if config.capture_backend == "scapy" else set()
    return needed, recommended


def privilege_checks(ctx: Context, held: set[str] | None = None) -> list[Check]:
    config = ctx.config
    assert config is not None
    held = effective_capabilities() if held is None else held
    needed, recommended = needed_capabilities(config)
    figure = (f"held: {' '.join(sorted(held)) or 'none'}; needed: {' '.join(sorted(needed))}"
              + (f"; recommended: {' '.join(sorted(recommended))}" if recommended else ""))
    data = {"held": sorted(held), "needed": sorted(needed), "recommended": sorted(recommended),
            "uid": os.geteuid()}
    missing = needed - held
    if missing:
        checks = [Check("privileges.capabilities", "fail", figure,
                        f"add {' '.join(sorted(missing))} (Kubernetes: securityContext."
                        f"capabilities.add; Docker: --cap-add)", data)]
    elif recommended - held:
        checks = [Check("privileges.capabilities", "warning", figure,
                        f"add {' '.join(sorted(recommended - held))} for full receive buffers",
                        data)]
    else:
        checks = [Check("privileges.capabilities", "ok", figure, data=data)]

    # The real test: open the kind of socket the capture backends open, bound to an interface.
    target = ctx.selected[0].name if ctx.selected else None
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as probe:
            if target is not None:
                probe.bind((target, 0))
    except PermissionError as exc:
        checks.append(Check("privileges.capture_socket", "fail",
                            f"a packet socket does not open: {exc.strerror}",
                            "give the container NET_RAW (and run as root or with the "
                            "capability in its effective set)"))
    except OSError as exc:
        checks.append(Check("privileges.capture_socket", "fail",
                            f"a packet socket does not open on {target}: {exc.strerror or exc}",
                            "check the interface and the container's network"))
    else:
        checks.append(_ok("privileges.capture_socket",
                          f"a packet socket opens{f' on {target}' if target else ''}"))
    return checks


# -- the kernel ------------------------------------------------------------------------------

SIOCETHTOOL = 0x8946
ETHTOOL_GTSO = 0x1E
ETHTOOL_GGSO = 0x23
ETHTOOL_GGRO = 0x2B
OFFLOADS = {"tso": ETHTOOL_GTSO, "gso": ETHTOOL_GGSO, "gro": ETHTOOL_GGRO}


def offloads(name: str) -> dict[str, bool | None]:
    """TSO/GSO/GRO of an interface through ``SIOCETHTOOL`` (no ethtool binary; these GET
    commands need no privilege). None where the driver does not say."""
    found: dict[str, bool | None] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for feature, command in OFFLOADS.items():
            value = ctypes.create_string_buffer(struct.pack("II", command, 0))
            # struct ifreq: char ifr_name[16]; then a union holding the ethtool_value pointer.
            ifreq = struct.pack("16sP", name.encode()[:15], ctypes.addressof(value))
            ifreq += bytes(40 - len(ifreq))
            try:
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
            except OSError:
                found[feature] = None
                continue
            found[feature] = bool(struct.unpack_from("II", value.raw)[1])
    return found


def _read_number(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def filter_check(check_id: str, expression: str, linktypes: Sequence[int], what: str) -> Check:
    """Compile ``expression`` for every link type; its size against the kernel's limit."""
    counts: dict[int, int] = {}
    for linktype in linktypes:
        try:
            counts[linktype] = len(compile_filter(expression, linktype))
        except FilterError as exc:
            return Check(check_id, "fail", str(exc), f"fix {what}", {"expression": expression})
    largest = max(counts.values())
    shown = expression if len(expression) <= 80 else expression[:80] + "..."
    figure = (f"{what} {shown!r} compiles to {largest} instructions "
              f"(kernel limit {BPF_MAXINSNS}; link types {', '.join(map(str, counts))})"
              if expression else f"no filter: every packet is captured ({largest} instruction)")
    data = {"expression": expression, "instructions": counts, "limit": BPF_MAXINSNS}
    if largest > BPF_MAXINSNS:
        return Check(check_id, "fail", figure,
                     f"shorten {what}: CIDR blocks (`net 10.0.0.0/8`) cost a couple of "
                     "instructions where a list of hosts costs several each", data)
    return Check(check_id, "ok", figure, data=data)


def kernel_checks(ctx: Context) -> list[Check]:
    config = ctx.config
    assert config is not None
    checks: list[Check] = []
    if ctx.kernel_filter is None:
        checks.append(_skip("kernel.filter", "the filter is unknown (see config.plugins)"))
    else:
        checks.append(filter_check("kernel.filter", ctx.kernel_filter, ctx.linktypes(),
                                   "BPF (with plugin filters)"))
    for interface in ctx.selected:
        found = offloads(interface.name)
        mtu = _read_number(f"/sys/class/net/{interface.name}/mtu")
        states = ", ".join(f"{k} {'on' if v else 'off' if v is not None else 'unknown'}"
                           for k, v in found.items())
        merged = [name for name, side in (("received", found.get("gro")),
                                          ("sent", found.get("tso") or found.get("gso")))
                  if side]
        if merged:
            meaning = (f"{' and '.join(merged)} frames are captured as the stack sees them, "
                       f"up to 64 KiB (MTU {mtu}): fewer, larger packets than on the wire, "
                       f"kept whole (snapshot length {SNAPLEN})")
        else:
            meaning = f"frames are captured as on the wire, at most the MTU ({mtu})"
        checks.append(_ok(f"kernel.offloads.{interface.name}", f"{states}: {meaning}",
                          mtu=mtu, **found))
    rmem_max = _read_number("/proc/sys/net/core/rmem_max")
    rmem_default = _read_number("/proc/sys/net/core/rmem_default")
    figure = f"net.core.rmem_max={rmem_max}, rmem_default={rmem_default}"
    data = {"rmem_max": rmem_max, "rmem_default": rmem_default}
    rcvbuf = config.plugin("scapy").get("rcvbuf") if config.capture_backend == "scapy" else None
    if rcvbuf is not None and rmem_max is not None and rmem_max < rcvbuf \
            and "NET_ADMIN" not in effective_capabilities():
        checks.append(Check("kernel.socket_buffers", "warning",
                            f"{figure}: the scapy backend's {rcvbuf}-byte receive buffer "
                            f"is capped at {rmem_max} without NET_ADMIN",
                            "add NET_ADMIN, raise net.core.rmem_max, or use the afpacket "
                            "backend (its ring is not limited by rmem_max)", data))
    else:
        note = " (the afpacket ring is not limited by them)" \
            if config.capture_backend == "afpacket" else ""
        checks.append(Check("kernel.socket_buffers", "ok", figure + note, data=data))
    return checks


# -- the vSensor -----------------------------------------------------------------------------


def _fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def describe_certificate(der: bytes) -> dict[str, Any]:
    """Subject, issuer, expiry and SHA-256 fingerprint of a DER certificate.

    Decoded by the ``ssl`` module's own decoder (``_ssl._test_decode_cert``, the one behind
    ``getpeercert()``) because the certificate of a failed handshake must be shown too and the
    image has no other X.509 parser; when that private helper is missing only the fingerprint
    is reported.
    """
    found: dict[str, Any] = {"fingerprint": _fingerprint(der)}
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return found
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:
        pem.write(ssl.DER_cert_to_PEM_cert(der))
        pem.flush()
        try:
            decoded = decode(pem.name)
        except (ssl.SSLError, ValueError):
            return found

    def name(parts: Iterable[Any]) -> str:
        return ", ".join(f"{k}={v}" for rdn in parts for k, v in rdn)

    found["subject"] = name(decoded.get("subject", ()))
    found["issuer"] = name(decoded.get("issuer", ()))
    not_after = decoded.get("notAfter")
    if not_after:
        expires = ssl.cert_time_to_seconds(not_after)
        found["not_after"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
        found["days_left"] = round((expires - time.time()) / 86400, 1)
    found["names"] = [v for _, v in decoded.get("subjectAltName", ())]
    return found


def _certificate_text(cert: Mapping[str, Any]) -> str:
    parts = [f"subject {cert.get('subject') or '(empty)'}", f"issuer {cert.get('issuer', '?')}"]
    if "not_after" in cert:
        parts.append(f"expires {cert['not_after']} ({cert['days_left']:+g} days)")
    parts.append(f"SHA-256 {cert['fingerprint']}")
    return ", ".join(parts)


def _tls_action(reason: str) -> str:
    lowered = reason.lower()
    if "expired" in lowered:
        return "renew the vSensor's certificate (or check this host's clock)"
    if "not yet valid" in lowered:
        return "check this host's clock, or wait until the certificate is valid"
    if "hostname" in lowered or "ip address mismatch" in lowered:
        return "use a VSENSOR_HOSTNAME the certificate names, or reissue the certificate"
    return ("give the CA that signed the vSensor's certificate in VSENSOR_CA_FILE, or pin the "
            "certificate with VSENSOR_TLS_FINGERPRINT")


def _connect_error(exc: BaseException, target: str, timeout: float) -> tuple[str, str]:
    """(what happened, what to do) for a failed TCP connection."""
    if isinstance(exc, TimeoutError):
        return (f"no answer from {target} within {timeout:g} s",
                "a firewall or network policy drops the packets; allow the sensor to reach the "
                "vSensor's port")
    if isinstance(exc, ConnectionRefusedError):
        return (f"connection refused by {target}: nothing listens there",
                "start the vSensor, or fix VSENSOR_PORT")
    code = getattr(exc, "errno", None)
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return (f"no route to {target} ({os.strerror(code)})",
                "add a route (default gateway) towards the vSensor, or fix VSENSOR_HOSTNAME")
    return (f"cannot connect to {target}: {getattr(exc, 'strerror', None) or exc}",
            "check the network path to the vSensor")


class VSensorProbe:
    """The vSensor checks, in order; each later one runs only when the path to it works."""

    def __init__(self, config: SensorConfig, plugins: LoadedPlugins, ctx: Context) -> None:
        self.config = config
        self.ctx = ctx
        self.https = config.plugin("https")
        self.timeout = float(self.https.get("timeout_seconds", 10.0))
        host = config.vsensor_hostname
        self.base_url = f"https://{config.vsensor_address}"
        self.host = host
        transport = plugins.manager.get_plugin(f"transport:{config.transport}")
        self._tls_setting = getattr(transport, "tls_setting", None)
        self.tls: Any = None
        self.vsensor_filter: str | None = None
        self.primary_address: str | None = None  # our side of the TCP connection
        self.registered = False

    async def run(self) -> list[Check]:
        checks: list[Check] = []

        def skip_after(check_id: str, why: str) -> list[Check]:
            return checks + [_skip(i, why)
                             for i in VSENSOR_CHECKS[VSENSOR_CHECKS.index(check_id) + 1:]]

        addresses, check = await self.resolve()
        checks.append(check)
        if not addresses:
            return skip_after("vsensor.dns", "needs vsensor.dns")
        address, check = await self.connect(addresses)
        checks.append(check)
        if address is None:
            return skip_after("vsensor.tcp", "needs vsensor.tcp")
        check = await self.handshake(address)
        checks.append(check)
        if check.status == "fail":
            return skip_after("vsensor.tls", "needs vsensor.tls")
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.tls, limit=2),
                timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            checks.append(await self.clock(session))
            if not self.config.hmac_key:
                return skip_after("vsensor.clock", "needs config.VSENSOR_HMAC_KEY")
            checks.append(await self.register(session))
            if not self.registered:  # the rest is signed the same way: it would fail alike
                return skip_after("vsensor.register", "needs vsensor.register")
            checks.append(self.filter())
            checks.append(await self.test_chunk(session))
            checks.append(await self.antigena(session))
        return checks

    async def resolve(self) -> tuple[list[tuple[int, str]], Check]:
        loop = asyncio.get_running_loop()
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self.host else socket.AF_INET, self.host)
        except OSError:
            pass
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            return [(family, self.host)], _ok("vsensor.dns", f"{self.host} is an IP address: "
                                                             "no name to resolve",
                                              addresses=[self.host])
        started = time.perf_counter()
        try:
            infos = await asyncio.wait_for(_getaddrinfo(loop, self.host, self.config.vsensor_port),
                                           self.timeout)
        except (OSError, TimeoutError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else \
                (getattr(exc, "strerror", None) or str(exc))
            return [], Check("vsensor.dns", "fail", f"{self.host!r} does not resolve: {reason}",
                             "fix VSENSOR_HOSTNAME, or the DNS (resolv.conf) of the sensor's "
                             "network", {"host": self.host})
        elapsed = (time.perf_counter() - started) * 1000
        addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
        shown = ", ".join(a for _, a in addresses)
        return addresses, _ok("vsensor.dns", f"{self.host} resolves to {shown} in "
                                             f"{elapsed:.1f} ms",
                              addresses=[a for _, a in addresses], milliseconds=elapsed)

    async def connect(self, addresses: list[tuple[int, str]]) -> tuple[str | None, Check]:
        port = self.config.vsensor_port
        failures: list[tuple[str, str]] = []
        for _, address in addresses:
            target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            started = time.perf_counter()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(address, port),
                                                   self.timeout)
            except (OSError, TimeoutError) as exc:
                failures.append(_connect_error(exc, target, self.timeout))
                continue
            elapsed = (time.perf_counter() - started) * 1000
            self.primary_address = str(writer.get_extra_info("sockname")[0]).split("%")[0]
            writer.close()
            await writer.wait_closed()
            return address, _ok("vsensor.tcp", f"connected to {target} in {elapsed:.1f} ms",
                                address=address, port=port, milliseconds=elapsed)
        return None, Check("vsensor.tcp", "fail", "; ".join(f for f, _ in failures),
                           failures[-1][1], {"port": port})

    async def _handshake(self, address: str, context: ssl.SSLContext) -> ssl.SSLObject:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            address, self.config.vsensor_port, ssl=context, server_hostname=self.host,
            ssl_handshake_timeout=self.timeout), self.timeout)
        try:
            return writer.get_extra_info("ssl_object")
        finally:
            writer.close()
            with contextlib.suppress(OSError):  # the peer may leave first: no finding
                await writer.wait_closed()

    async def handshake(self, address: str) -> Check:
        """The handshake as the transport makes it; the certificate is read in a first,
        unverified handshake so that it is shown even when verification fails."""
        if self._tls_setting is None:
            return _skip("vsensor.tls", f"transport {self.config.transport!r} has no TLS "
                                        "settings to test")
        try:
            self.tls = self._tls_setting(self.https.ca_file, self.https.fingerprint,
                                         self.https.tls_verify)
        except (TransportError, ValueError) as exc:
            return Check("vsensor.tls", "fail", str(exc), "fix VSENSOR_CA_FILE or "
                                                          "VSENSOR_TLS_FINGERPRINT")
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        unverified.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls_object = await self._handshake(address, unverified)
            der = tls_object.getpeercert(binary_form=True)
            version = tls_object.version()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
            return Check("vsensor.tls", "fail", f"no TLS handshake with {address}: {reason}",
                         "check that VSENSOR_PORT is the vSensor's HTTPS port (not plain HTTP "
                         "or another service)")
        cert = describe_certificate(der or b"")
        data = {"version": version, "certificate": cert}
        text = f"{version}, {_certificate_text(cert)}"
        if isinstance(self.tls, aiohttp.Fingerprint):
            pinned = self.tls.fingerprint
            actual = bytes.fromhex(cert["fingerprint"].replace(":", ""))
            if actual != pinned:
                return Check("vsensor.tls", "fail",
                             f"{text}: does not match VSENSOR_TLS_FINGERPRINT "
                             f"({_fingerprint_text(pinned)})",
                             "pin the fingerprint the vSensor logs at start, or fix "
                             "VSENSOR_HOSTNAME if this is another server", data)
            return Check("vsensor.tls", "ok", f"{text}: matches the pinned fingerprint",
                         data=data)
        if self.tls is False:
            return Check("vsensor.tls", "warning", f"{text}: not verified",
                         "VSENSOR_TLS_VERIFY is false: pin VSENSOR_TLS_FINGERPRINT or give "
                         "VSENSOR_CA_FILE so that the vSensor is authenticated", data)
        try:
            await self._handshake(address, self.tls)
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or str(exc)
            data["reason"] = reason
            return Check("vsensor.tls", "fail", f"{text}: verification fails: {reason}",
                         _tls_action(reason), data)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            return Check("vsensor.tls", "fail", f"{text}: verified handshake failed: {exc}",
                         "check the vSensor's TLS configuration", data)
        days = cert.get("days_left")
        if days is not None and days < EXPIRY_WARNING_DAYS:
            return Check("vsensor.tls", "warning", f"{text}: verified, expires soon",
                         "renew the vSensor's certificate", data)
        return Check("vsensor.tls", "ok", f"{text}: verified", data=data)

    def _headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {H_VERSION: str(max(PROTOCOL_VERSIONS)),
                **sign(self.config.hmac_key, method, path, body, self.config.name)}

    async def _request(self, session: aiohttp.ClientSession, check: str, method: str,
                       path: str, body: bytes, headers: Mapping[str, str],
                       ) -> tuple[int, Any, Mapping[str, str], float] | Check:
        """(status, JSON or text, headers, local time at the middle of the exchange), or the
        failed ``check`` when nothing answers."""
        started = time.time()
        try:
            async with session.request(method, self.base_url + path, data=body,
                                       headers=dict(headers)) as r:
                text = await r.text(errors="replace")
                middle = (started + time.time()) / 2
                status, answer_headers = r.status, r.headers
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Check(check, "fail", f"no answer: {exc or type(exc).__name__}",
                         "check the vSensor's logs")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = text
        return status, answer, answer_headers, middle

    async def clock(self, session: aiohttp.ClientSession) -> Check:
        """Every answer of the vSensor carries its time: a GET of the registration path is
        answered 405 without counting as an authentication failure there."""
        exchange = await self._request(session, "vsensor.clock", "GET", PATH_REGISTER, b"", {})
        if isinstance(exchange, Check):
            return exchange
        status, answer, headers, middle = exchange
        server: float | None = None
        try:
            server = float(headers[H_SERVER_TIME])
        except (KeyError, ValueError):
            if isinstance(answer, dict) and isinstance(answer.get("server_time"), (int, float)):
                server = float(answer["server_time"])
        if server is None:
            return Check("vsensor.clock", "warning", f"HTTP {status} without the vSensor's "
                                                     "time", "is this an ossensor vSensor?")
        offset = server - middle
        data = {"offset_seconds": round(offset, 3), "window_seconds": DEFAULT_SKEW_SECONDS}
        figure = (f"the vSensor's clock is {offset:+.1f} s from this host's "
                  f"(signatures are accepted within ±{DEFAULT_SKEW_SECONDS} s)")
        if abs(offset) > DEFAULT_SKEW_SECONDS:
            return Check("vsensor.clock", "fail", figure,
                         "synchronise the clocks (NTP) of this node and the vSensor: every "
                         "signed request is refused as clock_skew", data)
        if abs(offset) > CLOCK_WARNING_SECONDS:
            return Check("vsensor.clock", "warning", figure,
                         "the clocks drift apart: check NTP on this node and the vSensor", data)
        return Check("vsensor.clock", "ok", figure, data=data)

    def _instance(self) -> str:
        """The instance id the transport keeps in its spool folder, read only; else a new one."""
        spool = self.https.get("spool_dir", "")
        if spool:
            try:
                kept = (Path(spool) / "instance-id").read_text(encoding="ascii").strip()
                if len(kept) == 32:
                    return kept
            except (OSError, UnicodeDecodeError):
                pass
        return uuid.uuid4().hex

    async def register(self, session: aiohttp.ClientSession) -> Check:
        """The registration the sensor sends (the vSensor keeps the last one it got, so the
        body must match the https transport's); 401's reason tells a wrong key from the rest."""
        addresses: list[str] = []
        for interface in self.ctx.selected:
            addresses += [a for a in interface.routable_addresses if a not in addresses]
        message: dict[str, Any] = {
            "sensor": self.config.name, "versions": list(PROTOCOL_VERSIONS),
            "software": f"ossensor {__version__}", "instance": self._instance(),
            "addresses": addresses, "interfaces": [i.name for i in self.ctx.selected],
            # Verified and answered, nothing recorded: a running sensor is not disturbed.
            "probe": True}
        if self.primary_address is not None:
            message["primary_address"] = self.primary_address
        body = json.dumps(message).encode()
        headers = {"Content-Type": "application/json",
                   **self._headers("POST", PATH_REGISTER, body)}
        exchange = await self._request(session, "vsensor.register", "POST", PATH_REGISTER,
                                       body, headers)
        if isinstance(exchange, Check):
            return exchange
        status, answer, _, _ = exchange
        reason = answer.get("error") if isinstance(answer, dict) else None
        data = {"status": status, "reason": reason, "sensor": self.config.name}
        if status == 200 and isinstance(answer, dict):
            self.registered = True
            self.vsensor_filter = str(answer.get("filter") or "")
            data["version"] = answer.get("version")
            figure = (f"the vSensor accepts {self.config.name!r} (protocol "
                      f"{answer.get('version')}, addresses: {', '.join(addresses) or 'none'})")
            if answer.get("name_in_use") is True:
                data["name_in_use"] = True
                return Check("vsensor.register", "warning",
                             f"{figure}, but another live sensor holds this name",
                             "unless that is this host's running sensor, give each sensor its "
                             "own OSSENSOR_NAME (the DaemonSet uses the node name)", data)
            return Check("vsensor.register", "ok", figure, data=data)
        if status == 401 and reason == "bad_signature":
            return Check("vsensor.register", "fail",
                         "HTTP 401 bad_signature: the vSensor does not accept this key",
                         "set VSENSOR_HMAC_KEY to a key the vSensor accepts (the same "
                         "Secret on both sides)", data)
        if status == 401 and reason == "clock_skew":
            return Check("vsensor.register", "fail",
                         "HTTP 401 clock_skew: the key was not even tried, the timestamp is "
                         "outside the vSensor's window", "fix the clock (see vsensor.clock)",
                         data)
        if status == 426:
            return Check("vsensor.register", "fail", f"HTTP 426: no common protocol version "
                                                     f"({answer})",
                         "upgrade the sensor or the vSensor", data)
        return Check("vsensor.register", "fail", f"HTTP {status} {reason or answer!s:.200}",
                     "check the vSensor's logs for this sensor's requests", data)

    def filter(self) -> Check:
        """The vSensor's filter AND-ed with ours, as the sensor will apply it."""
        combined = combine_filters(self.vsensor_filter or "", self.ctx.kernel_filter or "")
        return filter_check("vsensor.filter", combined, self.ctx.linktypes(),
                            "the vSensor's filter AND-ed with BPF")

    async def test_chunk(self, session: aiohttp.ClientSession) -> Check:
        codec = ChunkCodec()
        body = codec.encode(Chunk(self.config.name, 0, (), time.time_ns()))
        headers = {"Content-Type": codec.media_type, H_SEQUENCE: "0", H_TEST: "1",
                   **self._headers("POST", PATH_CHUNKS, body)}
        exchange = await self._request(session, "vsensor.test_chunk", "POST", PATH_CHUNKS, body,
                                       headers)
        if isinstance(exchange, Check):
            return exchange
        status, answer, _, _ = exchange
        data = {"status": status, "answer": answer if isinstance(answer, dict) else None}
        if status == 200 and isinstance(answer, dict) and answer.get("test") is True:
            return Check("vsensor.test_chunk", "ok", "a test chunk was verified and "
                                                     "acknowledged (not stored)", data=data)
        if status == 200:
            return Check("vsensor.test_chunk", "warning",
                         f"the vSensor answered {answer!s:.100} instead of a test "
                         "acknowledgement", "upgrade the vSensor", data)
        return Check("vsensor.test_chunk", "fail", f"HTTP {status} {answer!s:.200}",
                     "check the vSensor's logs", data)

    async def antigena(self, session: aiohttp.ClientSession) -> Check:
        if not self.config.antigena_enabled:
            return _skip("antigena.websocket", "ANTIGENA_ENABLED is false")
        headers = self._headers("GET", PATH_ANTIGENA, b"")
        try:
            async with session.ws_connect(self.base_url + PATH_ANTIGENA, headers=headers,
                                          autoclose=True, heartbeat=None) as ws:
                try:  # the vSensor greets with the actions in force; not waiting long for it
                    greeting = await ws.receive_json(timeout=min(self.timeout, 2.0))
                except (TimeoutError, ValueError, TypeError):
                    greeting = None
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                return Check("antigena.websocket", "warning",
                             f"not available: the vSensor answers 404 for {PATH_ANTIGENA}",
                             "this vSensor sends no response actions; set "
                             "ANTIGENA_ENABLED=false to silence this", {"status": 404})
            return Check("antigena.websocket", "fail", f"the websocket does not open: HTTP "
                                                       f"{exc.status} {exc.message}",
                         "check the vSensor's logs (a proxy must pass websocket upgrades)",
                         {"status": exc.status})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Check("antigena.websocket", "fail", f"the websocket does not open: "
                                                       f"{exc or type(exc).__name__}",
                         "check the vSensor's logs", {})
        actions = greeting.get("actions") if isinstance(greeting, dict) else None
        told = f", {len(actions)} actions in force" if isinstance(actions, list) else ""
        return Check("antigena.websocket", "ok", f"the websocket {PATH_ANTIGENA} opens{told}",
                     data={"status": 101, "actions": len(actions) if actions is not None
                           else None})


def _getaddrinfo(loop: asyncio.AbstractEventLoop, host: str, port: int) -> asyncio.Future[Any]:
    """``getaddrinfo`` in a daemon thread: a resolver that hangs past our time-out must not hold
    up the exit (the loop's executor would be waited for)."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def resolve() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for the answer any more
            pass

    threading.Thread(target=resolve, name="diagnose getaddrinfo", daemon=True).start()
    return future


def _fingerprint_text(raw: bytes) -> str:
    return ":".join(f"{b:02X}" for b in raw)


VSENSOR_CHECKS = ("vsensor.dns", "vsensor.tcp", "vsensor.tls", "vsensor.clock",
                  "vsensor.register", "vsensor.filter", "vsensor.test_chunk",
                  "antigena.websocket")


def vsensor_checks(ctx: Context) -> list[Check]:
    config, plugins = ctx.config, ctx.plugins
    assert config is not None
    if plugins is None:
        return [_skip(i, "the plugins did not load (see config.plugins)") for i in VSENSOR_CHECKS]
    if config.transport != "https":
        return [_skip(i, f"OSSENSOR_TRANSPORT={config.transport} does not talk to a vSensor")
                for i in VSENSOR_CHECKS]
    bad = sorted(ctx.bad_variables & {"VSENSOR_HOSTNAME", "VSENSOR_PORT", "VSENSOR_CA_FILE",
                                      "VSENSOR_TLS_FINGERPRINT",
                                      "OSSENSOR_HTTPS_TIMEOUT_SECONDS"})
    if bad or not config.vsensor_hostname:
        bad = bad or ["VSENSOR_HOSTNAME"]
        return [_skip(i, f"needs {', '.join(f'config.{v}' for v in bad)}")
                for i in VSENSOR_CHECKS]
    return asyncio.run(VSensorProbe(config, plugins, ctx).run())


# -- the whole run ---------------------------------------------------------------------------


def diagnose(environ: Mapping[str, str]) -> list[Check]:
    """Every check, in order."""
    ctx = Context()
    checks = config_checks(environ, ctx)
    checks += interface_checks(ctx)
    checks += privilege_checks(ctx)
    checks += kernel_checks(ctx)
    checks += vsensor_checks(ctx)
    return checks


def exit_code(checks: Iterable[Check]) -> int:
    """0 only when nothing failed (warnings and skipped checks do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0


def render(checks: Sequence[Check], as_json: bool, secret: str = "") -> str:
    """One line per check (``status id figure -> action``), or JSON; ``secret`` is masked."""
    if as_json:
        counts = {s: sum(1 for c in checks if c.status == s)
                  for s in ("ok", "warning", "fail", "skip")}
        text = json.dumps({"checks": [c.as_json() for c in checks], "summary": counts,
                           "exit_code": exit_code(checks)}, indent=2, default=str)
    else:
        width = max((len(c.id) for c in checks), default=0)
        lines = []
        for c in checks:
            line = f"{c.status:<7} {c.id:<{width}}  {c.figure}"
            if c.action and c.status in ("warning", "fail"):
                line += f" -> {c.action}"
            lines.append(" ".join(line.split("\n")))
        text = "\n".join(lines)
    if secret:  # as given, and as JSON escapes it
        for form in {secret, json.dumps(secret)[1:-1]}:
            text = text.replace(form, "***")
    return text


def run_diagnose(environ: Mapping[str, str], as_json: bool) -> tuple[str, int]:
    """The report and the exit code, for the CLI."""
    checks = diagnose(environ)
    key = environ.get("VSENSOR_HMAC_KEY", "")
    return render(checks, as_json, key), exit_code(checks)

