"""The example third-party package (examples/ossensor-pcapfile), installed into a fresh venv.

The venv sees ossensor from the system site (``--system-site-packages``: a clean venv would need
network installs), but the example package is installed into the venv only, by pip, from its own
pyproject.toml. The sensor then replays a pcapng file through the example's ``pcapfile`` backend
and ``ethertype`` filter into the file transport, in a namespace; the stored pcapng must equal
the input, packet for packet. Without the package, the names are refused with what is there.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ossensor_core import hookspecs
from ossensor_core.wire.pcapng import PcapngWriter
from ossensor_core.testing import FakeCaptureSource, read_capture_file
from tests.helpers.cli import TEST_KEY, ossensor, sensor_environment
from tests.e2e import test_sensor as e2e_sensor
from tests.helpers.netns import Namespace, have_netns, namespaces, run

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ossensor-pcapfile"
START_NS = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the example package installed into it (and only into it)."""
    if not have_netns():
        pytest.skip("needs root and iproute2")
    base = tmp_path_factory.mktemp("venv")
    folder = base / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)])
    python = folder / "bin" / "python"
    # Built from a copy, so that pip's build folders never land in the source tree.
    source = shutil.copytree(EXAMPLE, base / "ossensor-pcapfile",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    where = run([str(python), "-c", "import ossensor_pcapfile; print(ossensor_pcapfile.__file__)"])
    assert where.stdout.startswith(str(folder)), where.stdout
    assert run([sys.executable, "-c", "import ossensor_pcapfile"], check=False).returncode != 0
    return python


@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    if not have_netns():
        pytest.skip("needs root and iproute2")
    with namespaces(1) as (space,):
        space.ip("link", "add", "pcap0", "type", "veth", "peer", "name", "pcap1")
        space.ip("link", "set", "pcap0", "up")
        yield space


def frames() -> list[tuple[int, int, bytes]]:
    """IPv4-like and IPv6-like frames of varied sizes, some cut short (wire length kept)."""
    found = []
    for n in range(600):
        ethertype = b"\x86\xdd" if n % 5 == 0 else b"\x08\x00"
        frame = b"\x02" * 6 + b"\x04" * 6 + ethertype + n.to_bytes(4, "big") + bytes(n % 1400)
        found.append((START_NS + n * 10_000, len(frame) + (7 if n % 11 == 0 else 0), frame))
    return found


def replay_env(tmp_path: Path, source: Path, **extra: str) -> dict[str, str]:
    return sensor_environment(tmp_path, OSSENSOR_CAPTURE_BACKEND="pcapfile",
                              OSSENSOR_PCAPFILE_PATH=str(source), OSSENSOR_NETWORK_DEVICE="pcap0",
                              ANTIGENA_ENABLED="false", OSSENSOR_NAME="replay",
                              OSSENSOR_LOGFILE_PATH=str(tmp_path / "sensor.log"), **extra)


def test_replay_through_the_installed_package(venv, ns, tmp_path, monkeypatch):
    packets = frames()
    source = tmp_path / "input.pcapng"
    with open(source, "wb") as out:
        writer = PcapngWriter(out, 1)
        for batch in FakeCaptureSource(packets, "eth0").read():
            writer.write_batch(batch)
    env = replay_env(tmp_path, source, OSSENSOR_PLUGINS="ethertype",
                     OSSENSOR_ETHERTYPE_DROP="0x86dd", OSSENSOR_TRACE_HOOKS="1")
    # The e2e helper, running the venv's interpreter instead of ours.
    monkeypatch.setattr(e2e_sensor, "COMMAND", [str(venv), "-m", "ossensor_core.ops.cli", "run"])
    sensor = e2e_sensor.Sensor(ns, env, tmp_path)
    try:
        sensor.wait_for_log(r"pcapfile: replayed 600 packets from .* on pcap0")
        ns.ip("link", "set", "pcap0", "down")  # an interface event, for the hook trace
        sensor.wait_for_log("interface pcap0 is down")
        code, _ = sensor.terminate(timeout=10)
        stderr = sensor.proc.stderr.read()
        assert code == 0, stderr
    finally:
        sensor.kill()
        ns.ip("link", "set", "pcap0", "up")
    stored = sorted((tmp_path / "out").glob("*.pcapng"))
    assert stored and not list((tmp_path / "out").glob("*.part"))
    kept = [p for p in packets if p[2][12:14] != b"\x86\xdd"]
    assert [p for path in stored for p in read_capture_file(path)[1]] == kept
    # Start-up hooks run before the log file is set up: their trace goes to stderr.
    text = stderr + sensor.log.read_text()
    traced = set(re.findall(r"hook trace: +(ossensor_\w+) \[hook\]", text))
    # Every hook, ossensor_configure included (called plugin by plugin, traced by the core).
    assert traced == {name for name in dir(hookspecs) if name.startswith("ossensor_")}
    assert TEST_KEY not in text


def test_plugins_listing_shows_the_package(venv):
    done = run([str(venv), "-m", "ossensor_core.ops.cli", "plugins"])
    listing = json.loads(done.stdout)
    pcapfile = next(p for p in listing["capture"] if p["name"] == "pcapfile")
    assert (pcapfile["distribution"], pcapfile["version"]) == ("ossensor-pcapfile", "0.1.0")
    assert "ossensor_capture_backend" in pcapfile["hooks"]
    assert [s["variable"] for s in pcapfile["settings"]] == [
        "OSSENSOR_PCAPFILE_PATH", "OSSENSOR_PCAPFILE_PACE", "OSSENSOR_PCAPFILE_BATCH_PACKETS"]
    assert any(p["name"] == "ethertype" for p in listing["plugin"])


def test_the_package_own_tests_pass_in_the_venv(venv, tmp_path):
    done = subprocess.run([str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(EXAMPLE / "tests")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_the_package_the_names_are_unknown(ns, tmp_path):
    source = tmp_path / "input.pcapng"
    source.write_bytes(b"")
    env = replay_env(tmp_path, source)
    result = ossensor(["run"], env, ns)
    assert result.code == 1
    assert "OSSENSOR_CAPTURE_BACKEND=pcapfile: no such capture plugin is installed; " \
           "available: afpacket, scapy" in result.stderr
    result = ossensor(["run"], dict(env, OSSENSOR_CAPTURE_BACKEND="afpacket",
                                    OSSENSOR_PLUGINS="ethertype"), ns)
    assert result.code == 1
    assert re.search(r"OSSENSOR_PLUGINS: no plugin named 'ethertype' is installed; available: "
                     r".*dedup.*slice", result.stderr), result.stderr
    assert TEST_KEY not in result.output
