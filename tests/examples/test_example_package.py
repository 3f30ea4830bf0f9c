"""The example third-party package (examples/ossensor-pcapfile), installed into a fresh venv.

The venv sees ossensor from the system site (``--system-site-packages``: a clean venv would need
network installs), but the example package is installed into the venv only, by pip, from its own
pyproject.toml. The sensor then replays a pcapng file through the example's ``pcapfile`` backend
and ``ethertype`` filter into the file transport, in a namespace; the stored pcapng must equal
the input, packet for packet. Without the package, the names are refused with what is there.

Third-party packages keep working: every test that uses the venv runs twice, with today's
example and with an unchanged copy of its 0.1 release (``tests/fixtures/ossensor-pcapfile-0.1``,
written against the flat core layout, before the plugin facade exported everything): its old
import paths still import, with a DeprecationWarning naming the new place. The tests that run a
sensor need network namespaces (``netns``); the others run without.
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
from ossensor_core.testing import read_capture_file, write_capture_file
from tests.helpers.cli import TEST_KEY, ossensor, sensor_environment
from tests.helpers import sensor as e2e_sensor
from tests.helpers.netns import Namespace, have_netns, namespaces, run

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "ossensor-pcapfile"
#: The example as released before the core was split into folders, kept byte for byte.
RELEASED = REPO / "tests" / "fixtures" / "ossensor-pcapfile-0.1"
START_NS = 1_700_000_000_000_000_000


@pytest.fixture(scope="module", params=[EXAMPLE, RELEASED], ids=["example", "released-0.1"])
def package(request) -> Path:
    """The example package's source: today's, or the 0.1 release unchanged."""
    return request.param


@pytest.fixture(scope="module")
def venv(tmp_path_factory, package) -> Path:
    """A venv with the example package installed into it (and only into it)."""
    base = tmp_path_factory.mktemp("venv")
    folder = base / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)])
    python = folder / "bin" / "python"
    # Built from a copy, so that pip's build folders never land in the source tree.
    source = shutil.copytree(package, base / "ossensor-pcapfile",
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


@pytest.mark.netns
def test_replay_through_the_installed_package(venv, ns, tmp_path, monkeypatch):
    packets = frames()
    source = write_capture_file(tmp_path / "input.pcapng", packets, interface="eth0")
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
    # Every hook of a run, ossensor_configure included (called plugin by plugin, traced by the
    # core); ossensor_diagnose belongs to `ossensor diagnose` and ossensor_metrics to a scrape.
    assert traced == {name for name in dir(hookspecs) if name.startswith("ossensor_")} - {
        "ossensor_diagnose", "ossensor_metrics"}
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


def test_the_package_own_tests_pass_in_the_venv(venv, package, tmp_path):
    tests = package / "tests"
    if package == RELEASED:  # out of tests/fixtures, whose conftest keeps it from collection
        tests = shutil.copytree(tests, tmp_path / "tests",
                                ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tests)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_released_package_is_kept_unchanged():
    """The copy is the 0.1 release as it was (commit ea3aac9), byte for byte."""
    import hashlib

    digests = {path.relative_to(RELEASED).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
               for path in sorted(RELEASED.rglob("*")) if path.is_file()
               and "__pycache__" not in path.parts}
    assert digests == RELEASED_DIGESTS


def test_old_import_paths_import_with_a_warning_naming_the_new_place(venv, package):
    """What the package imports, with every warning shown: today's example imports only the
    plugin facade (no warning); the 0.1 release imports the old flat module names, and each
    warns with the module's new place."""
    done = run([str(venv), "-W", "always::DeprecationWarning", "-c",
                "import ossensor_pcapfile.capture, ossensor_pcapfile.ethertype"])
    moved = re.findall(r"DeprecationWarning: (ossensor_core\.\w+) has moved to "
                       r"(ossensor_core\.[\w.]+)", done.stderr)
    if package == EXAMPLE:
        assert "DeprecationWarning" not in done.stderr, done.stderr
    else:
        assert ("ossensor_core.bpf", "ossensor_core.capture.bpf") in moved, done.stderr
        assert ("ossensor_core.settings", "ossensor_core.pipeline.settings") in moved


def test_old_import_path_warns_in_this_process():
    """``import ossensor_core.bpf`` (a flat name of 0.1) gives the module at its new place."""
    import importlib
    import warnings

    sys.modules.pop("ossensor_core.bpf", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("ossensor_core.bpf")
    from ossensor_core.capture import bpf

    assert old is bpf
    assert any(issubclass(w.category, DeprecationWarning)
               and "ossensor_core.bpf has moved to ossensor_core.capture.bpf" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


@pytest.mark.netns
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


#: SHA-256 of every file of the 0.1 release (``git archive ea3aac9 examples/ossensor-pcapfile``).
RELEASED_DIGESTS = {
    'README.md': 'd9fc88937b679a4e1ea873cd36e41f6294dcf4ee7449b59ac43728daa70297dc',
    'pyproject.toml': '864657ddef21ec7ff53f210317552fccfc197d2f6d05c1b74c64c278e7b85fd6',
    'src/ossensor_pcapfile/__init__.py':
        '2a80a2f64ae7adfb8a350adbfdb9f420d96b85c8b37981102fbafb6504297641',
    'src/ossensor_pcapfile/capture.py':
        '3b900e26c5c99bcd761927a2b987c88d78c99ffb6112b5c46544f11403f8cc97',
    'src/ossensor_pcapfile/ethertype.py':
        '6b0adac112137a7a50cf62f12d369c8165e063e5889f9c486efd0689f63c2ea5',
    'tests/test_pcapfile.py': 'bc4911f23d7c7a8eb676c6008817cef2456fc043077809b04720145fe95b5103',
}
