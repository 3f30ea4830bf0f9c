"""Claims within bounds (issue 16, item 2), against a real vSensor over TLS: a key holder that
claims the whole IPv4 space or public addresses does not make another sensor drop that
traffic; the claims it may make still count; what is ignored is shown with the reason."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from ossensor_core.wire.signing import PATH_REGISTER
from ossensor_vsensor.claims import ClaimPolicy, parse_allow
from ossensor_vsensor.cli import build_parser, prepare, UsageError
from tests.helpers.vsensor import running, settings

HOSTILE_WORKLOADS = ["1.0.0.0-223.255.255.255", "10.0.0.0/8", "2000::/3", "fd00::/8",
                     "10.9.0.0/24"]
HOSTILE_ADDRESSES = ["8.8.8.8", "10.1.0.5", "2001:4860::8888", "127.0.0.1", "fe80::1%eth0"]


def registration(name: str, addresses: list[str], workloads: list[str]) -> bytes:
    return json.dumps({"sensor": name, "versions": [1], "addresses": addresses,
                       "workloads": workloads, "features": ["peer-ranges"]}).encode()


def covered(ranges: list[str], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    for text in ranges:
        if "-" in text:
            first, last = (ipaddress.ip_address(t) for t in text.split("-"))
            if first.version == ip.version and first <= ip <= last:
                return True
        elif ip.version == ipaddress.ip_network(text).version and ip in ipaddress.ip_network(text):
            return True
    return False


def test_hostile_claims_are_ignored_shown_and_never_reach_another_sensors_filter(tmp_path,
                                                                                  tls):
    async def scenario():
        # No documentation ranges allowed here: the defaults exactly.
        async with running(settings(tmp_path, admin_token=None, claims_allow=[]), tls) as c:
            status, answer, _ = await c.post(
                PATH_REGISTER, registration("evil", HOSTILE_ADDRESSES, HOSTILE_WORKLOADS),
                sensor="evil")
            assert status == 200, answer  # the registration itself succeeds
            status, answer, _ = await c.post(
                PATH_REGISTER, registration("honest", ["10.2.0.7"], ["10.2.1.0/24"]),
                sensor="honest")
            assert status == 200, answer
            ranges = answer["peer_ranges"]["ranges"]
            # What evil may claim still counts (its private address, its /24 of pods) ...
            assert covered(ranges, "10.1.0.5") and covered(ranges, "10.9.0.77")
            # ... what it may not is never dropped by the honest sensor.
            for address in ("8.8.8.8", "1.1.1.1", "223.255.255.254", "10.3.0.1", "10.200.0.1",
                            "2001:4860::8888", "2a00::1", "fd00::1"):
                assert not covered(ranges, address), (address, ranges)
            status, text = await c.get("/status.json")
            evil = next(s for s in json.loads(text)["sensors"] if s["name"] == "evil")
            ignored = {i["claim"]: i["reason"] for i in evil["ignored_claims"]}
            assert ignored == {
                "8.8.8.8": "outside the claims allow-list",
                "2001:4860::8888": "outside the claims allow-list",
                "1.0.0.0-223.255.255.255": "wider than a /16",
                "10.0.0.0/8": "wider than a /16",
                "2000::/3": "wider than a /48",
                "fd00::/8": "wider than a /48"}
            assert evil["ignored_claims_count"] == 6
            honest = next(s for s in json.loads(text)["sensors"] if s["name"] == "honest")
            assert honest["ignored_claims"] == []
            status, page = await c.get("/status")
            assert status == 200 and "8.8.8.8: outside the claims allow-list" in page
            assert "1.0.0.0-223.255.255.255: wider than a /16" in page
    asyncio.run(scenario())


def test_an_operator_widens_the_list_for_public_node_addresses(tmp_path, tls):
    async def scenario():
        vsettings = settings(tmp_path, claims_allow=["203.0.113.0/24"],
                             claims_max_prefix_v4=24)
        async with running(vsettings, tls) as c:
            for name, address, pods in (("a", "203.0.113.5", "10.4.0.0/24"),
                                        ("b", "203.0.113.6", "10.5.0.0/23")):
                status, answer, _ = await c.post(PATH_REGISTER,
                                                 registration(name, [address], [pods]),
                                                 sensor=name)
                assert status == 200
            ranges = answer["peer_ranges"]["ranges"]  # b's view: a's public address counts
            assert covered(ranges, "203.0.113.5") and covered(ranges, "10.4.0.9")
            assert c.vsensor.sensors["b"].ignored_claims == [
                {"claim": "10.5.0.0/23", "reason": "wider than a /24"}]
    asyncio.run(scenario())


def test_the_policy_itself():
    policy = ClaimPolicy()
    assert policy.sort(["100.64.1.2", "fc00::5", "172.31.255.255", "192.168.0.1"], []) == (
        ["100.64.1.2", "fc00::5", "172.31.255.255", "192.168.0.1"], [], [])
    kept, _, ignored = policy.sort(["172.32.0.1", "169.254.1.1", "::1"], [])
    # Link-local and loopback are never claimed (filters.claimed_set): not shown as ignored.
    assert kept == ["169.254.1.1", "::1"]
    assert ignored == [{"claim": "172.32.0.1", "reason": "outside the claims allow-list"}]
    # A range across two allowed networks is not inside one of them.
    assert policy.refusal(ipaddress.ip_address("10.255.255.0"),
                          ipaddress.ip_address("11.0.0.5")) == "outside the claims allow-list"
    with pytest.raises(ValueError):
        policy.sort(["not-an-address"], [])


@pytest.mark.parametrize("argv, message", [
    (["--claims-allow", "10.0.0.1/8"], "--claims-allow '10.0.0.1/8': not a network"),
    (["--claims-allow", "fe80::/10%eth0"], "--claims-allow 'fe80::/10%eth0': not a network"),
    (["--claims-allow", "10.0.0.0/8,banana"], "--claims-allow 'banana': not a network"),
    (["--claims-allow", "10.0.0.1"], "--claims-allow '10.0.0.1': not a network"),
    (["--claims-allow", "10.0.0.0/8,"], "--claims-allow '': not a network"),
])
def test_bad_claims_options_name_the_option(tmp_path, argv, message):
    args = build_parser().parse_args(["--listen", "127.0.0.1:8443", "--data-dir",
                                      str(tmp_path), *argv])
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(args, {"VSENSOR_HMAC_KEY": "k"})


@pytest.mark.parametrize("argv, message", [
    (["--claims-max-prefix", "33"], "argument --claims-max-prefix: '33' is not at least 1"),
    (["--claims-max-prefix6", "-1"], "argument --claims-max-prefix6: '-1' is not at least 1"),
    (["--claims-max-prefix", "0"], "argument --claims-max-prefix: '0' is not at least 1"),
])
def test_bad_claims_prefixes_are_refused_by_the_parser_naming_the_option(tmp_path, capsys,
                                                                         argv, message):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--listen", "127.0.0.1:8443", "--data-dir", str(tmp_path),
                                   *argv])
    assert message in capsys.readouterr().err


def test_claims_options_reach_the_settings(tmp_path):
    args = build_parser().parse_args(["--listen", "127.0.0.1:8443", "--data-dir",
                                      str(tmp_path), "--claims-allow", "203.0.113.0/24",
                                      "--claims-allow", "2001:db8::/32,198.51.100.0/24",
                                      "--claims-max-prefix", "20"])
    vsettings = prepare(args, {"VSENSOR_HMAC_KEY": "k"})[0]
    assert vsettings.claims_max_prefix_v4 == 20 and vsettings.claims_max_prefix_v6 == 48
    assert [str(n) for n in parse_allow(vsettings.claims_allow)] == [
        "203.0.113.0/24", "2001:db8::/32", "198.51.100.0/24"]
