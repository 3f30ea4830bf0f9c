"""``ossensor diagnose`` offline: configuration sources, the report format, the exit code, key
masking, and the pieces that classify what the network checks measured. The checks against
real interfaces and real vSensors are in ``tests/e2e/test_diagnose.py``."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from ossensor_core.capture.bpf import BPF_MAXINSNS
from ossensor_core.client import tls_setting
from ossensor_core.ops.diagnose import (Check, Context, config_checks, describe_certificate,
                                        effective_capabilities, exit_code, filter_check,
                                        needed_capabilities, privilege_checks, render)
from ossensor_core.ops.diagnose import connect_error as _connect_error
from ossensor_core.ops.diagnose import plugin_checks as vsensor_checks
from ossensor_core.ops.diagnose import tls_action as _tls_action
from ossensor_core.errors import TransportError
from tests.helpers.cli import TEST_KEY, sensor_environment

HUGE_FILTER = " or ".join(f"ether[{i}] = {i % 256}" for i in range(1500))


def configured(tmp_path: Path, **overrides: str) -> tuple[Context, dict[str, Check]]:
    ctx = Context()
    checks = config_checks(sensor_environment(tmp_path, **overrides), ctx)
    return ctx, {c.id: c for c in checks}


def test_every_variable_with_its_source(tmp_path: Path) -> None:
    _, checks = configured(tmp_path, VSENSOR_PORT="8443", NETWORK_DEVICE_WHITELIST="eth",
                           NETWORK_DEVICE_EXCLUDELIST="veth")
    assert checks["config.VSENSOR_PORT"].data["source"] == "variable"
    assert checks["config.OSSENSOR_DEBUG"].data["source"] == "default"
    legacy = checks["config.NETWORK_DEVICE_INCLUDELIST"]
    assert legacy.status == "ok"
    assert (legacy.data["source"], legacy.data["from"]) == ("legacy", "NETWORK_DEVICE_WHITELIST")
    assert "NETWORK_DEVICE_WHITELIST" in legacy.figure
    assert checks["config.NETWORK_DEVICE_EXCLUDELIST"].data["value"] == "veth"
    assert checks["config.VSENSOR_HMAC_KEY"].data["value"] == "***"
    assert checks["config.plugins"].status == "ok"
    # Plugin settings are listed as well (the file transport was chosen).
    assert "config.OSSENSOR_OUTPUT_DIR" in checks


def test_problems_land_on_their_variable(tmp_path: Path) -> None:
    ctx, checks = configured(tmp_path, VSENSOR_PORT="abc", NETWORK_DEVICE_BLACKLIST="(",
                             VSENSOR_HMAC_KEY="")
    assert checks["config.VSENSOR_PORT"].status == "fail"
    assert "'abc'" in checks["config.VSENSOR_PORT"].figure
    assert checks["config.NETWORK_DEVICE_EXCLUDELIST"].status == "fail"  # by its legacy name
    assert checks["config.VSENSOR_HMAC_KEY"].status == "fail"
    assert {c.id for c in checks.values() if c.status == "fail"} == {
        "config.VSENSOR_PORT", "config.NETWORK_DEVICE_EXCLUDELIST", "config.VSENSOR_HMAC_KEY"}
    assert ctx.bad_variables == {"VSENSOR_PORT", "NETWORK_DEVICE_EXCLUDELIST",
                                 "VSENSOR_HMAC_KEY"}


def test_unknown_plugin_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    ctx, checks = configured(tmp_path, OSSENSOR_TRANSPORT="pigeon")
    assert checks["config.plugins"].status == "fail"
    assert "pigeon" in checks["config.plugins"].figure
    assert ctx.plugins is None
    assert {c.status for c in vsensor_checks(ctx)} == {"skip"}


def test_vsensor_checks_skip_without_a_vsensor_or_with_a_bad_port(tmp_path: Path) -> None:
    ctx, _ = configured(tmp_path)  # the file transport
    skipped = vsensor_checks(ctx)
    assert {c.status for c in skipped} == {"skip"}
    assert "OSSENSOR_TRANSPORT=file" in skipped[0].figure
    ctx, _ = configured(tmp_path, OSSENSOR_TRANSPORT="https", VSENSOR_PORT="99999")
    skipped = vsensor_checks(ctx)
    assert [c.id for c in skipped][:2] == ["vsensor.dns", "vsensor.tcp"]
    assert all(c.status == "skip" and "config.VSENSOR_PORT" in c.figure for c in skipped)


def test_text_report_one_line_per_check_and_the_key_masked() -> None:
    checks = [Check("a.first", "ok", "fine", "never shown for ok"),
              Check("b.second", "warning", "meh", "look at it"),
              Check("c.third", "fail", f"a message quoting {TEST_KEY}\nover two lines",
                    "do this")]
    text = render(checks, as_json=False, secret=TEST_KEY)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["ok", "a.first", "fine"] and "->" not in lines[0]
    assert lines[1].endswith("-> look at it")
    assert TEST_KEY not in text and "***" in lines[2]


def test_key_masked_in_json_even_when_json_escapes_it() -> None:
    key = 'q"uote\\slash7'
    checks = [Check("a", "fail", f"said {key}", data={"echo": key})]
    text = render(checks, as_json=True, secret=key)
    assert key not in text and json.dumps(key)[1:-1] not in text
    assert json.loads(text)["checks"][0]["data"]["echo"] == "***"


def test_json_report_and_exit_code() -> None:
    checks = [Check("a", "ok", "x"), Check("b", "skip", "y"), Check("c", "warning", "z",
                                                                     data={"n": 1})]
    report = json.loads(render(checks, as_json=True, secret=TEST_KEY))
    assert [c["id"] for c in report["checks"]] == ["a", "b", "c"]
    assert report["checks"][2] == {"id": "c", "status": "warning", "figure": "z", "action": "",
                                   "data": {"n": 1}}
    assert report["summary"] == {"ok": 1, "warning": 1, "fail": 0, "skip": 1}
    assert report["exit_code"] == exit_code(checks) == 0
    assert exit_code([*checks, Check("d", "fail", "no")]) == 1


def test_capabilities_from_proc_status(tmp_path: Path) -> None:
    status = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n"
    assert effective_capabilities(status) == {"NET_ADMIN", "NET_RAW"}
    assert effective_capabilities("CapEff:\t0000000000001000\n") == {"NET_ADMIN"}
    ctx, _ = configured(tmp_path)
    assert needed_capabilities(ctx.config) == ({"NET_RAW"}, set())
    ctx, _ = configured(tmp_path, OSSENSOR_CAPTURE_BACKEND="scapy")
    assert needed_capabilities(ctx.config) == ({"NET_RAW"}, {"NET_ADMIN"})
    capabilities = privilege_checks(ctx, held={"NET_ADMIN"})[0]
    assert (capabilities.id, capabilities.status) == ("privileges.capabilities", "fail")
    assert "NET_RAW" in capabilities.action
    assert privilege_checks(ctx, held={"NET_RAW"})[0].status == "warning"  # NET_ADMIN missing


def test_filter_against_the_kernel_limit() -> None:
    over = filter_check("kernel.filter", HUGE_FILTER, [1], "BPF")
    assert over.status == "fail" and over.data["instructions"][1] > BPF_MAXINSNS
    assert "kernel limit 4096" in over.figure and "CIDR" in over.action
    broken = filter_check("kernel.filter", "tcp port", [1], "BPF")
    assert broken.status == "fail" and "does not compile" in broken.figure
    assert filter_check("kernel.filter", "", [1, 101], "BPF").status == "ok"
    fine = filter_check("kernel.filter", "udp port 53", [1, 101], "BPF")
    assert fine.status == "ok" and set(fine.data["instructions"]) == {1, 101}


def test_certificate_details_of_an_expired_certificate() -> None:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert("vsensor.test", not_before=now - datetime.timedelta(days=10),
                         not_after=now - datetime.timedelta(days=2))
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    found = describe_certificate(der)
    assert found["fingerprint"].replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    assert -3 < found["days_left"] < -1
    assert "trustme" in found["issuer"] and found["names"] == ["vsensor.test"]


@pytest.mark.parametrize("error, words", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "nothing listens"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "no route"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "no route"),
    (TimeoutError(), "no answer"),
])
def test_connection_failures_are_told_apart(error: BaseException, words: str) -> None:
    what, action = _connect_error(error, "192.0.2.1:443", 3)
    assert words in what and action


def test_tls_actions_follow_the_reason() -> None:
    assert "renew" in _tls_action("certificate has expired")
    assert "VSENSOR_HOSTNAME" in _tls_action("Hostname mismatch, certificate is not valid")
    assert "VSENSOR_CA_FILE" in _tls_action("unable to get local issuer certificate")


def test_the_transport_tls_setting_is_shared(tmp_path: Path) -> None:
    pin = tls_setting("", "AB:" * 31 + "AB", True)
    assert isinstance(pin, aiohttp.Fingerprint) and pin.fingerprint == b"\xab" * 32
    assert tls_setting("", "", False) is False
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = tls_setting(str(tmp_path / "ca.pem"), "", True)
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(TransportError, match="cannot read the CA file"):
        tls_setting(str(tmp_path / "bad.pem"), "", True)


def test_the_vsensor_checks_come_from_the_https_transport(tmp_path: Path) -> None:
    """``ossensor_diagnose``: the transport that talks to the vSensor contributes its checks."""
    from ossensor_core.ops.diagnose import VSENSOR_CHECKS
    from ossensor_plugins import transport_https

    ctx, _ = configured(tmp_path, OSSENSOR_TRANSPORT="https", VSENSOR_PORT="99999")
    assert ctx.config is not None and ctx.plugins is not None
    checks = transport_https.ossensor_diagnose(config=ctx.config, context=ctx)
    assert [c.id for c in checks] == list(VSENSOR_CHECKS)
    assert all(c.status == "skip" and "config.VSENSOR_PORT" in c.figure for c in checks)
    hooked = [c for result in ctx.plugins.hook.ossensor_diagnose(config=ctx.config, context=ctx)
              for c in result]
    assert [c.id for c in hooked] == list(VSENSOR_CHECKS)
