"""The sensor's configuration: the guide's environment variables, read once into a frozen object.

Every variable of the original's guide is here with its default, plus the variables that pick
plugins. Plugins never read ``os.environ``: their own settings are declared through the
``ossensor_settings`` hook and arrive in :attr:`SensorConfig.plugin_settings`.
"""

from __future__ import annotations

import configparser
import io
import ipaddress
import os
import re
import socket
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ossensor_core.node.patterns import ExtendedRegex, PatternError
from ossensor_core.errors import ConfigError
from ossensor_core.pipeline.settings import (PluginSettings, ResolvedSetting, Setting, SettingsGroup,
                                            resolve_settings, shown, split_words)
from ossensor_core.wire.names import MAX_CHUNK_BYTES, SENSOR_NAME_HELP, valid_sensor_name

#: The largest OSSENSOR_CHUNK_BYTES: half the vSensor's body limit, so that a chunk (its records,
#: plus up to one ring block cut with it, plus the format's framing when zstd does not help)
#: stays under the limit. A proxy with a lower limit answers 413: the transport splits then.
CHUNK_BYTES_MAX = MAX_CHUNK_BYTES // 2

# -- checks of single values (``Setting.check``): raise ValueError without the variable's name --

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(text: str) -> None:
    """A host name (DNS labels) or an IP address, without a port."""
    host = text.strip()
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"must not contain a port ({shown(host)}): give the host alone and "
                             "set the port in VSENSOR_PORT") from None
        return
    if not all(_HOST_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
        raise ValueError(f"{shown(host)} is not a host name or IP address")


def check_address(text: str) -> None:
    """``host:port`` or ``[IPv6]:port`` with an IP address (or localhost) as the host."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isascii() or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"{shown(text)}: give host:port, e.g. 127.0.0.1:9853")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{shown(text)}: the host must be an IP address (or localhost)") \
                from None


def check_writable_file(text: str) -> None:
    """A file we can append to (or create): not a folder, its folder present and writable."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{shown(text)} is a folder, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{shown(text)} is not writable")
        return
    if not path.parent.is_dir():
        raise ValueError(f"{shown(text)}: the folder {shown(str(path.parent))} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{shown(text)}: cannot create files in {shown(str(path.parent))}")


def check_not_a_file(text: str) -> None:
    """A folder (created when missing): refuse a path that is, or lies under, something else."""
    path = Path(text.strip()).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{shown(text)}: {shown(str(folder))} is not a folder")
            return


def check_config_path(text: str) -> None:
    """The generated file, replaced atomically: never a folder, a device or a FIFO (root would
    replace ``/dev/zero``), never under a file."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{shown(text)} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise ValueError(f"cannot write the configuration file {shown(text)}: it is not a "
                         "regular file")
    for folder in path.absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"cannot write the configuration file {shown(text)} "
                                 f"({shown(str(folder))} is not a folder)")
            return


#: The most Service ranges OSSENSOR_SERVICE_RANGES takes (a cluster has one or two per family).
MAX_SERVICE_RANGES = 64


def parse_service_ranges(text: str) -> tuple[str, ...]:
    """``10.96.0.0/12 fd00:10:96::/108``: prefixes, separated by spaces or commas."""
    words = split_words(text)
    if len(words) > MAX_SERVICE_RANGES:
        raise ValueError(f"names {len(words)} ranges, more than the {MAX_SERVICE_RANGES} allowed")
    ranges = []
    for word in words:
        try:
            ranges.append(str(ipaddress.ip_network(word, strict=False)))
        except ValueError:
            raise ValueError(f"{shown(word)} is not an address prefix (e.g. 10.96.0.0/12)") \
                from None
    return tuple(ranges)


def check_service_ranges(text: str) -> None:
    parse_service_ranges(text)


CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("VSENSOR_HOSTNAME", str, None, "Host name or IP address of the vSensor, without a port.",
            required=True, max_length=255, check=check_host),
    Setting("VSENSOR_HMAC_KEY", str, None, "Shared HMAC key for talking to the vSensor.",
            required=True, secret=True, max_length=1024),
    Setting("VSENSOR_PORT", int, 443, "Port of the vSensor.", minimum=1, maximum=65535),
    Setting("OSSENSOR_NETWORK_DEVICE", str, "",
            "Capture this interface only. Unset: every selected interface; the default-route "
            "interface identifies the sensor."),
    Setting("OSSENSOR_CONFIG_PATH", str, "/etc/darktrace/ossensor.cfg",
            "Where the generated configuration file is written.", check=check_config_path),
    Setting("OSSENSOR_DEBUG", int, 1, "Log detail, 0 (basic) to 5 (every packet as hex).",
            minimum=0, maximum=5),
    Setting("ANTIGENA_ENABLED", bool, True, "Receive and enforce Antigena response actions."),
    Setting("ANTIGENA_TIME_PERIOD", float, 5.0,
            "Seconds between reports of Antigena actions to the vSensor.", positive=True,
            maximum=3600),
    Setting("NETWORK_DEVICE_EXCLUDELIST", str, "",
            "White-space separated egrep patterns of interfaces never captured; wins over the "
            "include list.", legacy=("NETWORK_DEVICE_BLACKLIST",)),
    Setting("NETWORK_DEVICE_INCLUDELIST", str, "",
            "White-space separated egrep patterns; when given, only matching interfaces are "
            "captured.", legacy=("NETWORK_DEVICE_WHITELIST",)),
    Setting("NETWORK_DEVICE_ANY", bool, False,
            "Also capture interfaces that appear after start-up (same include/exclude rules)."),
    Setting("BPF", str, "", "Berkeley Packet Filter expression, AND-ed with the vSensor's filter.",
            max_length=65536),
    Setting("OSSENSOR_LOGFILE_PATH", str, "/dev/stdout", "Where the log is written.",
            check=check_writable_file),
    Setting("OSSENSOR_NAME", str, socket.gethostname(),
            "Name of this sensor at the vSensor (a DaemonSet sets it to the node name)."),
    Setting("OSSENSOR_CAPTURE_BACKEND", str, "afpacket",
            "Capture backend plugin: afpacket (TPACKET_V3 ring) or scapy (portable)."),
    Setting("OSSENSOR_TRANSPORT", str, "https", "Transport plugin: https (to a vSensor) or file."),
    Setting("OSSENSOR_PLUGINS", str, "",
            "Extra plugins to load, in order, separated by spaces or commas."),
    Setting("OSSENSOR_DISABLE_PLUGINS", str, "", "Plugins not to load, separated by spaces or commas."),
    Setting("OSSENSOR_CHUNK_BYTES", int, 4 << 20,
            "A chunk is cut when its packet records reach this many bytes.", minimum=4096,
            maximum=CHUNK_BYTES_MAX),
    Setting("OSSENSOR_CHUNK_SECONDS", float, 1.0,
            "A chunk is cut at the latest this many seconds after its first batch.",
            positive=True, maximum=60),
    Setting("OSSENSOR_STATS_SECONDS", float, 10.0,
            "Seconds between capture counter reports (debug level 1).", positive=True,
            maximum=86400),
    Setting("OSSENSOR_TRACE_HOOKS", bool, False, "Log every plugin hook call (for plugin authors)."),
    Setting("OSSENSOR_RUN_DIR", str, "",
            "Folder of the status file that `ossensor health` reads; empty: the folder of "
            "OSSENSOR_CONFIG_PATH.", check=check_not_a_file),
    Setting("OSSENSOR_METRICS_ADDRESS", str, "",
            "host:port of the Prometheus metrics endpoint (e.g. 127.0.0.1:9853); empty: off.",
            check=check_address),
    Setting("OSSENSOR_SINGLE_COPY", bool, True,
            "With every interface captured (NETWORK_DEVICE_ANY=1, no include/exclude list), give "
            "each interface a kernel filter so that a packet crossing the node is stored once "
            "(docs/deploy.md)."),
    Setting("OSSENSOR_SERVICE_RANGES", str, "",
            "Service (ClusterIP) prefixes, separated by spaces or commas: a pod's packet to "
            "them is kept on its veth, before the DNAT.", max_length=4096,
            check=check_service_ranges),
    Setting("OSSENSOR_POD_COPY", bool, False,
            "Also keep, on a pod's veth, its traffic with other hosts as the pod sees it "
            "(before masquerading): stored twice, once as the uplink carries it."),
    Setting("OSSENSOR_KEEP_ENCAPSULATED", bool, False,
            "Keep the encapsulated copy of overlay traffic (VXLAN, Geneve, WireGuard, IPIP, "
            "GRE) on the uplink as well as the inner packet on the tunnel device."),
)


@dataclass(frozen=True)
class SensorConfig:
    """The whole configuration of one sensor process, parsed and checked. Never mutated."""

    vsensor_hostname: str
    hmac_key: str = field(repr=False)
    vsensor_port: int
    network_device: str
    config_path: Path
    debug: int
    antigena_enabled: bool
    antigena_time_period: float
    exclude_patterns: tuple[str, ...]
    include_patterns: tuple[str, ...]
    device_any: bool
    bpf: str
    logfile: str
    name: str
    capture_backend: str
    transport: str
    plugins: tuple[str, ...]
    disabled_plugins: tuple[str, ...]
    trace_hooks: bool
    chunk_bytes: int
    chunk_seconds: float
    stats_seconds: float
    run_dir: str = ""
    metrics_address: str = ""
    single_copy: bool = True
    service_ranges: tuple[str, ...] = ()
    pod_copy: bool = False
    keep_encapsulated: bool = False
    settings: Mapping[str, ResolvedSetting] = field(repr=False, default_factory=dict)
    plugin_settings: Mapping[str, PluginSettings] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "plugin_settings", MappingProxyType(dict(self.plugin_settings)))

    def plugin(self, name: str) -> PluginSettings:
        """The settings that plugin ``name`` declared, parsed (empty if it declared none)."""
        return self.plugin_settings.get(name, PluginSettings(name))

    @property
    def vsensor_address(self) -> str:
        """``host:port``, with an IPv6 address in brackets."""
        host = self.vsensor_hostname
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.vsensor_port}"

    @property
    def every_interface(self) -> bool:
        """Every interface of the node is captured, also those that appear later: the only
        case in which the single-copy rules can place every packet (``node/placement.py``)."""
        return self.device_any and not self.network_device and not self.include_patterns \
            and not self.exclude_patterns

    @property
    def single_copy_active(self) -> bool:
        return self.single_copy and self.every_interface

    def all_settings(self) -> dict[str, ResolvedSetting]:
        """Core and plugin settings by variable name."""
        found = {resolved.variable: resolved for resolved in self.settings.values()}
        for group in self.plugin_settings.values():
            found.update({resolved.variable: resolved for resolved in group.resolved.values()})
        return found


def compile_patterns(variable: str, patterns: tuple[str, ...], problems: list[str]) -> None:
    """Append a problem for every pattern that is not a valid extended regular expression."""
    for pattern in patterns:
        try:
            ExtendedRegex(pattern)
        except PatternError as exc:
            problems.append(
                f"{variable}: pattern {pattern!r} is not a valid extended regular expression "
                f"({exc.reason})"
            )


def read_core_config(environ: Mapping[str, str]) -> tuple[SensorConfig, list[str]]:
    """Parse the core variables. Returns the configuration and every problem found.

    The configuration is usable for reporting even when problems were found: invalid values fall
    back to their defaults there, and the caller refuses to run.
    """
    problems: list[str] = []
    resolved = resolve_settings(CORE_SETTINGS, environ, None, problems)
    values: dict[str, Any] = {name: item.value for name, item in resolved.items()}

    host = (values["VSENSOR_HOSTNAME"] or "").strip().strip("[]")

    name = values["OSSENSOR_NAME"].strip()
    if not valid_sensor_name(name):
        source = resolved["OSSENSOR_NAME"].from_variable or "the host name (OSSENSOR_NAME unset)"
        problems.append(f"{source}: {name[:64]!r} is not a sensor name ({SENSOR_NAME_HELP}); "
                        f"the vSensor refuses it: set OSSENSOR_NAME")

    exclude = split_words(values["NETWORK_DEVICE_EXCLUDELIST"])
    include = split_words(values["NETWORK_DEVICE_INCLUDELIST"])
    compile_patterns(resolved["NETWORK_DEVICE_EXCLUDELIST"].from_variable or
                     "NETWORK_DEVICE_EXCLUDELIST", exclude, problems)
    compile_patterns(resolved["NETWORK_DEVICE_INCLUDELIST"].from_variable or
                     "NETWORK_DEVICE_INCLUDELIST", include, problems)

    config = SensorConfig(
        vsensor_hostname=host,
        hmac_key=values["VSENSOR_HMAC_KEY"] or "",
        vsensor_port=values["VSENSOR_PORT"],
        network_device=values["OSSENSOR_NETWORK_DEVICE"].strip(),
        config_path=Path(values["OSSENSOR_CONFIG_PATH"]),
        debug=values["OSSENSOR_DEBUG"],
        antigena_enabled=values["ANTIGENA_ENABLED"],
        antigena_time_period=values["ANTIGENA_TIME_PERIOD"],
        exclude_patterns=exclude,
        include_patterns=include,
        device_any=values["NETWORK_DEVICE_ANY"],
        bpf=values["BPF"].strip(),
        logfile=values["OSSENSOR_LOGFILE_PATH"],
        name=name,
        capture_backend=values["OSSENSOR_CAPTURE_BACKEND"].strip(),
        transport=values["OSSENSOR_TRANSPORT"].strip(),
        plugins=split_words(values["OSSENSOR_PLUGINS"]),
        disabled_plugins=split_words(values["OSSENSOR_DISABLE_PLUGINS"]),
        trace_hooks=values["OSSENSOR_TRACE_HOOKS"],
        chunk_bytes=values["OSSENSOR_CHUNK_BYTES"],
        chunk_seconds=values["OSSENSOR_CHUNK_SECONDS"],
        stats_seconds=values["OSSENSOR_STATS_SECONDS"],
        run_dir=values["OSSENSOR_RUN_DIR"].strip(),
        metrics_address=values["OSSENSOR_METRICS_ADDRESS"].strip(),
        single_copy=values["OSSENSOR_SINGLE_COPY"],
        service_ranges=parse_service_ranges(values["OSSENSOR_SERVICE_RANGES"]),
        pod_copy=values["OSSENSOR_POD_COPY"],
        keep_encapsulated=values["OSSENSOR_KEEP_ENCAPSULATED"],
        settings=resolved,
    )
    return config, problems


def render_config_file(config: SensorConfig, devices: list[str]) -> str:
    """The INI file the original container generated, with its section and key names."""
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the keys' case
    antigena = "true" if config.antigena_enabled else "false"
    parser["osSensor"] = {
        "Debug": str(config.debug),
        "vSensor": config.vsensor_address,
        "key": config.hmac_key,
        "device": ",".join(devices),
        "logfile": config.logfile,
        "useAntigena": antigena,
        "useWebsocket": antigena,
        "sendAntigenaActionDelta": f"{config.antigena_time_period:g}",
        "blacklist_device": " ".join(config.exclude_patterns),
        "bpf": config.bpf,
    }
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def write_config_file(config: SensorConfig, devices: list[str]) -> None:
    """Write the file atomically with mode 0600, creating parent folders.

    Raises ConfigError naming ``OSSENSOR_CONFIG_PATH`` when it cannot be written.
    """
    path = config.config_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:  # mkstemp creates the file with mode 0600
                handle.write(render_config_file(config, devices))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise ConfigError(
            [f"OSSENSOR_CONFIG_PATH: cannot write the configuration file {str(path)!r} "
             f"({exc.strerror or exc})"]
        ) from exc


# -- the vSensor connection (TLS), shared by the transport, Antigena and diagnose ----------

#: The name of the core's settings group for the vSensor connection (``config.plugin(...)``).
SETTINGS_GROUP = "vsensor"
ENV_CA_FILE = "VSENSOR_CA_FILE"
ENV_FINGERPRINT = "VSENSOR_TLS_FINGERPRINT"
ENV_TLS_VERIFY = "VSENSOR_TLS_VERIFY"
#: The largest CA bundle read (the system's is about 200 KiB).
MAX_CA_FILE_BYTES = 16 << 20
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def normalise_fingerprint(text: str) -> str:
    """Lower-case hex without separators; raises ValueError unless it is a SHA-256."""
    value = text.strip().lower().replace(":", "").replace(" ", "")
    if not _FINGERPRINT.fullmatch(value):
        raise ValueError(f"{shown(text)} is not a SHA-256 fingerprint (64 hex digits, colons "
                         "allowed)")
    return value


def check_fingerprint(text: str) -> None:
    normalise_fingerprint(text)


def check_ca_file(text: str) -> None:
    """A readable regular file of a sane size that holds at least one PEM certificate."""
    try:  # O_NONBLOCK: a FIFO must not block start-up
        with open(text, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ValueError(f"{shown(text)} is not a file")
            pem = handle.read(MAX_CA_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {shown(text)} ({exc.strerror or exc})") from None
    if len(pem) > MAX_CA_FILE_BYTES:
        raise ValueError(f"{shown(text)} is larger than {MAX_CA_FILE_BYTES >> 20} MiB")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{shown(text)} holds no PEM certificate")


def connection_settings() -> SettingsGroup:
    """The vSensor connection settings (``ossensor_core.client.tls`` uses them): the core's, read
    at start-up whatever plugins are loaded or disabled (``pipeline/startup.py``)."""
    return SettingsGroup(SETTINGS_GROUP, [
        Setting("ca_file", str, "",
                "CA bundle (PEM) that verifies the vSensor's certificate; empty: the system CAs.",
                env=ENV_CA_FILE, check=check_ca_file),
        Setting("fingerprint", str, "",
                "SHA-256 fingerprint of the vSensor's DER certificate (hex; colons and case "
                "ignored) to pin instead of CA verification; a self-signed certificate then "
                "works.", env=ENV_FINGERPRINT, max_length=200, check=check_fingerprint),
        Setting("tls_verify", bool, True,
                "Verify the vSensor's certificate; false turns verification off (the connection "
                "is then not authenticated, and a warning says so).", env=ENV_TLS_VERIFY),
    ])
