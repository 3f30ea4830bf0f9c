"""The host's checks: interfaces, privileges and the kernel (offloads, socket buffers, the
size of the filter)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from ossensor_core.capture.bpf import BPF_MAXINSNS, compile_filter
from ossensor_core.errors import FilterError, InterfaceError
from ossensor_core.node.interfaces import (InterfaceSelector, list_interfaces,
                                           primary_interface)
from ossensor_core.node.patterns import PatternError
from ossensor_core.pipeline.config import SensorConfig
from ossensor_core.pipeline.startup import decide
from ossensor_core.wire.names import SNAPLEN

from .checks import Check, Context, Status, ok, skip


def interface_checks(ctx: Context) -> list[Check]:
    """Every interface with its decision and reason, what is captured, and the primary one."""
    config = ctx.config
    assert config is not None
    try:
        selector = InterfaceSelector(config.include_patterns, config.exclude_patterns,
                                     config.network_device)
    except PatternError:
        return [skip("interfaces.selected", "an include or exclude pattern is invalid "
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
        checks.append(ok("interfaces.selected", f"capturing {', '.join(selected)}",
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
        checks.append(ok("privileges.capture_socket",
                          f"a packet socket opens{f' on {target}' if target else ''}"))
    return checks


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
        checks.append(skip("kernel.filter", "the filter is unknown (see config.plugins)"))
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
        checks.append(ok(f"kernel.offloads.{interface.name}", f"{states}: {meaning}",
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
