"""``ossensor check``: the guide's variables, defaults, legacy names and every refusal."""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Iterator

import pytest

from tests.helpers.cli import ossensor
from tests.helpers.netns import Namespace, have_netns, namespaces

KEY = "Kx9secretHMACkey42"


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    """One namespace with a veth pair (eth0/eth1 style names), a tap and a bridge."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (space,):
        space.ip("link", "add", "eth0", "type", "veth", "peer", "name", "veth0")
        space.ip("link", "add", "eth7", "type", "veth", "peer", "name", "veth7")
        space.ip("link", "add", "br0", "type", "bridge")
        space.ip("tuntap", "add", "tap0", "mode", "tap")
        for name in ("eth0", "veth0", "eth7", "veth7", "br0"):
            space.ip("link", "set", name, "up")
        space.ip("addr", "add", "192.0.2.10/24", "dev", "eth0")
        yield space


def check(env: dict[str, str], ns: Namespace):
    return ossensor(["check"], env, ns)


def test_defaults_and_sources(base_env, ns):
    result = check(base_env, ns)
    assert result.code == 0, result.stderr
    report = result.json()
    assert sorted(report["interfaces"]) == ["br0", "eth0", "eth7", "tap0", "veth0", "veth7"]
    assert report["capture_backend"] == "afpacket"
    assert report["transport"] == "file"
    assert report["plugins"] == []
    assert report["bpf"] == ""
    assert report["primary_interface"] == "eth0"
    assert "no default route" in report["primary_interface_source"]
    settings = report["settings"]
    expected_defaults = {
        "VSENSOR_PORT": 443, "OSSENSOR_NETWORK_DEVICE": "", "OSSENSOR_DEBUG": 1,
        "ANTIGENA_ENABLED": True, "ANTIGENA_TIME_PERIOD": 5.0, "NETWORK_DEVICE_EXCLUDELIST": "",
        "NETWORK_DEVICE_INCLUDELIST": "", "NETWORK_DEVICE_ANY": False, "BPF": "",
        "OSSENSOR_LOGFILE_PATH": "/dev/stdout",
    }
    for variable, value in expected_defaults.items():
        assert settings[variable] == {"value": value, "source": "default"}, variable
    assert settings["VSENSOR_HMAC_KEY"] == {"value": "***", "source": "variable"}
    assert settings["OSSENSOR_CONFIG_PATH"]["source"] == "variable"
    assert KEY not in result.output


def test_config_path_default_is_the_originals(base_env, ns):
    env = dict(base_env)
    del env["OSSENSOR_CONFIG_PATH"]
    # Only look at the reported default: a real write to /etc is never done by tests.
    from ossensor_core.pipeline.config import CORE_SETTINGS
    default = {s.name: s.default for s in CORE_SETTINGS}["OSSENSOR_CONFIG_PATH"]
    assert default == "/etc/darktrace/ossensor.cfg"


def test_config_file_written_like_the_original(base_env, ns, tmp_path):
    env = dict(base_env, BPF="not port 80", NETWORK_DEVICE_EXCLUDELIST="^veth",
               ANTIGENA_ENABLED="false", ANTIGENA_TIME_PERIOD="7", OSSENSOR_DEBUG="2",
               VSENSOR_PORT="8443", OSSENSOR_CONFIG_PATH=str(tmp_path / "a" / "b" / "os.cfg"))
    result = check(env, ns)
    assert result.code == 0, result.stderr
    path = tmp_path / "a" / "b" / "os.cfg"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    parser = configparser.RawConfigParser()
    parser.optionxform = str
    parser.read(path)
    section = dict(parser["osSensor"])
    assert sorted(section.pop("device").split(",")) == ["br0", "eth0", "eth7", "tap0"]
    assert section == {
        "Debug": "2", "vSensor": "vsensor.test:8443", "key": KEY,
        "logfile": "/dev/stdout", "useAntigena": "false",
        "useWebsocket": "false", "sendAntigenaActionDelta": "7", "blacklist_device": "^veth",
        "bpf": "not port 80",
    }
    assert [p.name for p in path.parent.iterdir()] == ["os.cfg"]  # no temporary left behind


def test_include_exclude_as_in_the_guide(base_env, ns):
    env = dict(base_env, NETWORK_DEVICE_EXCLUDELIST="eth7", NETWORK_DEVICE_INCLUDELIST="^eth")
    report = check(env, ns).json()
    assert report["interfaces"] == ["eth0"]
    reasons = {d["interface"]: d["reason"] for d in report["decisions"]}
    assert reasons["eth7"] == "excluded by pattern 'eth7'"
    assert reasons["veth0"] == "matches no include pattern"
    assert reasons["lo"] == "loopback is never captured"


def test_legacy_names_and_new_name_wins(base_env, ns):
    env = dict(base_env, NETWORK_DEVICE_WHITELIST="^eth", NETWORK_DEVICE_BLACKLIST="7$")
    report = check(env, ns).json()
    assert report["interfaces"] == ["eth0"]
    assert report["settings"]["NETWORK_DEVICE_INCLUDELIST"] == {
        "value": "^eth", "source": "legacy", "from": "NETWORK_DEVICE_WHITELIST"}
    env["NETWORK_DEVICE_INCLUDELIST"] = "^br"
    env["NETWORK_DEVICE_EXCLUDELIST"] = "^x"
    report = check(env, ns).json()
    assert report["interfaces"] == ["br0"]
    assert report["settings"]["NETWORK_DEVICE_INCLUDELIST"]["source"] == "variable"


def test_posix_bracket_classes(base_env, ns):
    env = dict(base_env, NETWORK_DEVICE_INCLUDELIST="^[[:alpha:]]+[[:digit:]]$",
               NETWORK_DEVICE_EXCLUDELIST="^[[:lower:]]{4}[0-9]")
    assert sorted(check(env, ns).json()["interfaces"]) == ["br0", "eth0", "eth7", "tap0"]


def test_network_device_alone(base_env, ns):
    env = dict(base_env, OSSENSOR_NETWORK_DEVICE="tap0", NETWORK_DEVICE_INCLUDELIST="^eth")
    report = check(env, ns).json()
    assert report["interfaces"] == ["tap0"]
    assert report["primary_interface"] == "tap0"


def test_default_route_interface_is_primary(base_env, ns):
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "eth0", check=False)
    try:
        report = check(dict(base_env, NETWORK_DEVICE_INCLUDELIST="^br"), ns).json()
        assert report["interfaces"] == ["br0"]
        assert (report["primary_interface"], report["primary_interface_source"]) == \
            ("eth0", "default route")
    finally:
        ns.ip("route", "del", "default", check=False)


def test_booleans_any_case(base_env, ns):
    for text, value in (("TRUE", True), ("yes", True), ("1", True), ("No", False),
                        ("0", False), ("False", False)):
        report = check(dict(base_env, ANTIGENA_ENABLED=text), ns).json()
        assert report["settings"]["ANTIGENA_ENABLED"]["value"] is value


def test_ipv6_hostname_accepted(base_env, ns):
    report = check(dict(base_env, VSENSOR_HOSTNAME="2001:db8::5"), ns).json()
    assert report["vsensor"] == "[2001:db8::5]:443"


@pytest.mark.parametrize("overrides, expected", [
    ({"VSENSOR_HOSTNAME": ""}, "VSENSOR_HOSTNAME is required"),
    ({"VSENSOR_HMAC_KEY": ""}, "VSENSOR_HMAC_KEY is required"),
    ({"VSENSOR_HOSTNAME": "vsensor.test:443"}, "set the port in VSENSOR_PORT"),
    ({"VSENSOR_PORT": "0"}, "VSENSOR_PORT: '0' is below the minimum 1"),
    ({"VSENSOR_PORT": "65536"}, "VSENSOR_PORT: '65536' is above the maximum 65535"),
    ({"VSENSOR_PORT": "https"}, "VSENSOR_PORT: 'https' is not a whole number"),
    ({"OSSENSOR_DEBUG": "6"}, "OSSENSOR_DEBUG: '6' is above the maximum 5"),
    ({"OSSENSOR_DEBUG": "-1"}, "OSSENSOR_DEBUG: '-1' is below the minimum 0"),
    ({"ANTIGENA_ENABLED": "maybe"}, "ANTIGENA_ENABLED: 'maybe' is not a boolean"),
    ({"NETWORK_DEVICE_ANY": "2"}, "NETWORK_DEVICE_ANY: '2' is not a boolean"),
    ({"ANTIGENA_TIME_PERIOD": "0"}, "ANTIGENA_TIME_PERIOD: '0' must be greater than 0"),
    ({"ANTIGENA_TIME_PERIOD": "-5"}, "ANTIGENA_TIME_PERIOD: '-5' must be greater than 0"),
    ({"NETWORK_DEVICE_EXCLUDELIST": "^veth [b-a]"},
     "NETWORK_DEVICE_EXCLUDELIST: pattern '[b-a]' is not a valid extended regular expression"),
    ({"NETWORK_DEVICE_WHITELIST": "eth("},
     "NETWORK_DEVICE_WHITELIST: pattern 'eth(' is not a valid extended regular expression"),
    ({"BPF": "udp portx 53"}, "BPF: filter 'udp portx 53' does not compile: "),
    ({"BPF": " and ".join(f"not net 10.{i // 250}.{i % 250}.0/24" for i in range(280))},
     "more than the kernel's limit of 4096"),
    ({"OSSENSOR_NETWORK_DEVICE": "nosuch0"}, "OSSENSOR_NETWORK_DEVICE: no interface named 'nosuch0'"),
    ({"NETWORK_DEVICE_INCLUDELIST": "^wlan"},
     "check NETWORK_DEVICE_INCLUDELIST and NETWORK_DEVICE_EXCLUDELIST"),
    ({"OSSENSOR_CONFIG_PATH": "/proc/ossensor/ossensor.cfg"},
     "OSSENSOR_CONFIG_PATH: cannot write the configuration file"),
    ({"OSSENSOR_CAPTURE_BACKEND": "pfring"},
     "OSSENSOR_CAPTURE_BACKEND=pfring: no such capture plugin is installed; available: afpacket, scapy"),
    ({"OSSENSOR_TRANSPORT": "carrier-pigeon"},
     "OSSENSOR_TRANSPORT=carrier-pigeon: no such transport plugin is installed; available: "),
    ({"OSSENSOR_PLUGINS": "nosuchfilter"},
     "OSSENSOR_PLUGINS: no plugin named 'nosuchfilter' is installed"),
    ({"OSSENSOR_DISABLE_PLUGINS": "nothing"},
     "OSSENSOR_DISABLE_PLUGINS: no plugin named 'nothing' is installed"),
])
def test_refusals(base_env, ns, overrides, expected):
    env = dict(base_env, **overrides)
    timeout = 120 if "BPF" in overrides else 60
    result = ossensor(["check"], env, ns, timeout=timeout)
    assert result.code == 1, result.output
    assert expected in result.stderr
    assert result.stdout == ""
    assert KEY not in result.output


def test_all_problems_reported_together(base_env, ns):
    env = dict(base_env, VSENSOR_PORT="99999", OSSENSOR_DEBUG="9", ANTIGENA_ENABLED="perhaps",
               BPF="tcp port", NETWORK_DEVICE_INCLUDELIST="(")
    del env["VSENSOR_HOSTNAME"]
    result = check(env, ns)
    assert result.code == 1
    for variable in ("VSENSOR_HOSTNAME", "VSENSOR_PORT", "OSSENSOR_DEBUG", "ANTIGENA_ENABLED",
                     "BPF", "NETWORK_DEVICE_INCLUDELIST"):
        assert variable in result.stderr


def test_nothing_selected_waits_with_device_any(base_env, ns):
    env = dict(base_env, NETWORK_DEVICE_INCLUDELIST="^cali", NETWORK_DEVICE_ANY="1")
    result = check(env, ns)
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["interfaces"] == []
    assert report["waiting_for_interfaces"] is True


def test_config_dir_created_and_unwritable_dir_refused(base_env, ns, tmp_path):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    (blocked / "file").write_text("x")
    env = dict(base_env, OSSENSOR_CONFIG_PATH=str(blocked / "file" / "ossensor.cfg"))
    result = check(env, ns)
    assert result.code == 1
    assert "OSSENSOR_CONFIG_PATH: cannot write" in result.stderr
    assert os.path.exists(blocked / "file")


def test_vsensor_connection_settings_are_the_cores_even_with_its_defaults_disabled(base_env, ns,
                                                                                    tmp_path):
    """The transport, Antigena and diagnose all read the vSensor's TLS settings: they are read
    whatever is loaded, also with the file transport and the core's default hooks disabled."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot parsed by check\n-----END CERTIFICATE-----\n")
    result = check({**base_env, "OSSENSOR_DISABLE_PLUGINS": "core", "VSENSOR_CA_FILE": str(ca),
                    "VSENSOR_TLS_VERIFY": "false"}, ns)
    assert result.code == 0, result.stderr
    settings = result.json()["settings"]
    assert settings["VSENSOR_CA_FILE"]["value"] == str(ca)
    assert settings["VSENSOR_TLS_VERIFY"]["value"] is False
