"""Plugins found through real entry points of installed distributions (a site folder made here)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import ossensor
from tests.helpers.netns import Namespace, have_netns, namespaces

REPO = Path(__file__).resolve().parents[2]
KEY = "Kx9secretHMACkey42"


def make_distribution(site: Path, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """Write ``<name>-1.0.dist-info`` with METADATA and entry_points.txt, as pip would."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def install_maxlen(site: Path) -> None:
    make_distribution(site, "ossensor-maxlen", {"ossensor.plugins": {
        "maxlen": "tests.fixtures.plugins.maxlen"}})


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (space,):
        space.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        yield space


@pytest.fixture
def site(tmp_path, base_env) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "site"
    folder.mkdir()
    env = dict(base_env, PYTHONPATH=os.pathsep.join([str(folder), str(REPO)]))
    return folder, env


def test_third_party_plugin_loads_with_its_settings(site, ns):
    folder, env = site
    install_maxlen(folder)
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="maxlen",
                                      OSSENSOR_MAXLEN_LIMIT="9000"), ns)
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["plugins"] == ["maxlen"]
    assert report["settings"]["OSSENSOR_MAXLEN_LIMIT"] == {"value": 9000, "source": "variable"}
    assert report["settings"]["OSSENSOR_MAXLEN_MODE"] == {"value": "drop", "source": "default"}

    listing = json.loads(ossensor(["plugins"], env).stdout)
    entry = next(p for p in listing["plugin"] if p["name"] == "maxlen")
    assert entry["version"] == "1.0"
    assert entry["hooks"] == ["ossensor_configure", "ossensor_packet_filter", "ossensor_settings"]
    assert [s["variable"] for s in entry["settings"]] == ["OSSENSOR_MAXLEN_LIMIT",
                                                         "OSSENSOR_MAXLEN_MODE"]
    assert {p["name"] for p in listing["capture"]} >= {"afpacket", "scapy"}


def test_plugin_settings_and_configure_errors_reported_with_core_errors(site, ns):
    folder, env = site
    install_maxlen(folder)
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="maxlen", OSSENSOR_MAXLEN_LIMIT="0",
                                      OSSENSOR_MAXLEN_MODE="keep", OSSENSOR_DEBUG="8"), ns)
    assert result.code == 1
    assert "OSSENSOR_MAXLEN_LIMIT: '0' is below the minimum 1" in result.stderr
    assert "OSSENSOR_MAXLEN_MODE: 'keep' is not one of drop" in result.stderr
    assert "OSSENSOR_DEBUG" in result.stderr
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="maxlen", OSSENSOR_MAXLEN_LIMIT="13"),
                      ns)
    assert result.code == 1
    assert "OSSENSOR_MAXLEN_LIMIT: 13 is unlucky" in result.stderr


def test_plugin_that_fails_to_import(site, ns):
    folder, env = site
    make_distribution(folder, "ossensor-broken", {"ossensor.plugins": {
        "broken": "tests.fixtures.plugins.broken_import"}})
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="broken"), ns)
    assert result.code == 1
    assert "plugin 'broken' (tests.fixtures.plugins.broken_import) failed to load: RuntimeError: " \
           "simulated import failure: libfoo is missing" in result.stderr
    assert KEY not in result.output
    listing = json.loads(ossensor(["plugins"], env).stdout)
    broken = next(p for p in listing["plugin"] if p["name"] == "broken")
    assert "libfoo is missing" in broken["error"]


def test_two_plugins_with_the_same_name(site, ns):
    folder, env = site
    make_distribution(folder, "ossensor-twin-a", {"ossensor.plugins": {"twin": "tests.fixtures.plugins.twin"}})
    make_distribution(folder, "ossensor-twin-b", {"ossensor.plugins": {
        "twin": "tests.fixtures.plugins.maxlen"}})
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="twin"), ns)
    assert result.code == 1
    assert "plugin 'twin' is provided by more than one installed package" in result.stderr
    assert "ossensor-twin-a" in result.stderr and "ossensor-twin-b" in result.stderr


def test_a_capture_backend_shadowing_a_builtin_is_refused(site, ns):
    folder, env = site
    make_distribution(folder, "ossensor-fake-capture", {"ossensor.capture": {
        "afpacket": "tests.fixtures.plugins.twin"}})
    result = ossensor(["check"], env, ns)
    assert result.code == 1
    assert "capture plugin 'afpacket' is provided by more than one installed package" in \
        result.stderr


def test_unknown_names_list_what_is_available(site, ns):
    folder, env = site
    install_maxlen(folder)
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="maxlen,nosuch"), ns)
    assert result.code == 1
    assert ("OSSENSOR_PLUGINS: no plugin named 'nosuch' is installed; available: dedup, maxlen, "
            "slice") in result.stderr


def test_disable_plugins(site, ns):
    folder, env = site
    install_maxlen(folder)
    result = ossensor(["check"], dict(env, OSSENSOR_PLUGINS="maxlen",
                                      OSSENSOR_DISABLE_PLUGINS="maxlen"), ns)
    assert result.code == 0, result.stderr
    assert result.json()["plugins"] == []
    result = ossensor(["check"], dict(env, OSSENSOR_DISABLE_PLUGINS="afpacket"), ns)
    assert result.code == 1
    assert "OSSENSOR_CAPTURE_BACKEND=afpacket is also listed in OSSENSOR_DISABLE_PLUGINS" in \
        result.stderr
