"""The container image, built with podman from the Dockerfile on a local debootstrap base, run
with the DaemonSet's security settings (UID 0, every capability dropped but NET_RAW and
NET_ADMIN, no privilege escalation, read-only root file system, config and spool on tmpfs) in a
network namespace of this test: it captures real traffic and ships it to a real vSensor.

Not part of `make test` (the build takes minutes): `make test-image`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import TEST_KEY
from tests.helpers.sensor import SENDER, numbered
from tests.helpers.vsensor_process import VSensor
from tests.helpers.netns import Namespace, unique, veth_pair

# Only under `make test-image` (it sets this): the build takes minutes, too long for `make test`.
pytestmark = pytest.mark.skipif(os.environ.get("OSSENSOR_TEST_IMAGE") != "1",
                                reason="image test: run `make test-image`")

HERE = Path(__file__).resolve().parent
IMAGE = "localhost/ossensor:test"
ENV = {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}
#: The DaemonSet's securityContext (deploy/base/sensor-daemonset.yaml), in podman's words.
SECURITY = ["--user", "0", "--cap-drop", "ALL", "--cap-add", "NET_RAW,NET_ADMIN",
            "--security-opt", "no-new-privileges", "--read-only",
            "--tmpfs", "/etc/darktrace:rw,size=1m", "--tmpfs", "/var/spool/ossensor:rw,size=64m"]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        message = f"{tool} is not installed (tests/image/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert not check or done.returncode == 0, f"podman {' '.join(args)}:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    need("podman")
    need("debootstrap")
    started = time.monotonic()
    done = subprocess.run(["bash", str(HERE / "build.sh"), IMAGE], env=ENV, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.0f} s")
    yield IMAGE


def test_image_contents(image):
    """Entry point, both commands, labels, no compiler, and no key in the image."""
    inspect = podman("image", "inspect", image, "--format",
                     "{{json .Config.Entrypoint}} {{index .Config.Labels "
                     "\"org.opencontainers.image.title\"}}").stdout.strip()
    assert inspect == '["ossensor"] ossensor'
    labels = json.loads(podman("image", "inspect", image, "--format",
                               "{{json .Config.Labels}}").stdout)
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.base.name"] == "localhost/ossensor-base:bookworm"
    assert podman("run", "--rm", image, "--version").stdout.startswith("ossensor ")
    assert "usage: ossensor-vsensor" in podman("run", "--rm", "--entrypoint", "ossensor-vsensor",
                                               image, "--help").stdout
    found = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                   "command -v gcc cc make python3-config pip3 || true").stdout.split()
    assert found == [], found


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "ossensor-imagetest"
version = "0.0.1"
dependencies = ["ossensor"]

[project.entry-points."ossensor.plugins"]
imagetest = "ossensor_imagetest"
"""
PLUGIN_MODULE = """from ossensor_core.plugin import hookimpl


@hookimpl
def ossensor_startup(config):
    pass
"""


def test_derived_image_with_a_plugin(image, tmp_path):
    """docs/deploy.md's recipe: deploy/examples/Dockerfile.plugin adds a plugin package."""
    (tmp_path / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (tmp_path / "ossensor_imagetest.py").write_text(PLUGIN_MODULE)
    derived = "localhost/ossensor-imagetest:test"
    secret = ["--secret", "id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt"] \
        if Path("/etc/ssl/certs/ca-certificates.crt").is_file() else []
    podman("build", "--quiet", "--format", "docker", "--network", "host", *secret,
           "--build-arg", f"OSSENSOR_IMAGE={image}", "-t", derived,
           "-f", str(HERE.parents[1] / "deploy" / "examples" / "Dockerfile.plugin"),
           str(tmp_path), timeout=600)
    try:
        listing = json.loads(podman("run", "--rm", "--no-healthcheck", derived,
                                    "plugins").stdout)
        (entry,) = [p for p in listing["plugin"] if p["name"] == "imagetest"]
        assert entry["hooks"] == ["ossensor_startup"]
        assert podman("run", "--rm", "--entrypoint", "sh", derived, "-c",
                      "ls /src 2>&1 || true").stdout.strip().endswith("No such file or directory")
    finally:
        podman("rmi", derived, check=False)


class Container:
    """``podman run`` of the sensor inside namespace ``ns``, logs to a file."""

    def __init__(self, ns: Namespace, image: str, env: dict[str, str], log: Path,
                 security: list[str]) -> None:
        self.name = unique("osc")
        self.log = log
        env_args = [arg for k, v in env.items() for arg in ("-e", f"{k}={v}")]
        self.proc = subprocess.Popen(
            ["podman", "run", "--rm", "--no-healthcheck", "--name", self.name, "--network",
             f"ns:/run/netns/{ns.name}", *security, *env_args, image, "run"],
            env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def stop(self) -> int:
        podman("stop", "--time", "30", self.name, check=False, timeout=60)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def sensor_env(fingerprint: str) -> dict[str, str]:
    return {"VSENSOR_HOSTNAME": "127.0.0.1", "VSENSOR_PORT": "8443",
            "VSENSOR_HMAC_KEY": TEST_KEY, "VSENSOR_TLS_FINGERPRINT": fingerprint,
            "OSSENSOR_NAME": "image-node", "ANTIGENA_ENABLED": "false",
            "NETWORK_DEVICE_INCLUDELIST": "^rx0$", "OSSENSOR_DEBUG": "2",
            "OSSENSOR_METRICS_ADDRESS": "127.0.0.1:9853"}


def test_daemonset_settings_capture_to_a_vsensor(image, netns_pair, tmp_path):
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        vsensor = VSensor(rx, tmp_path / "vsensor", TEST_KEY)
        container = None
        try:
            container = Container(rx, image, sensor_env(vsensor.fingerprint),
                                  tmp_path / "sensor.log", SECURITY)
            container.wait_for("capturing on rx0")
            container.wait_for("kernel filter is now", timeout=30)  # registered
            deadline = time.monotonic() + 30
            while (probe := podman("exec", container.name, "ossensor", "health",
                                   check=False)).returncode != 0:
                assert time.monotonic() < deadline, probe.stderr
                time.sleep(1)
            assert probe.stdout.startswith("ready: registered, capturing on rx0")
            tx.exec(sys.executable, "-c", SENDER, "192.0.2.2", "7030", "2000")
            time.sleep(2)
            assert container.stop() == 0, container.log.read_text()
        finally:
            if container is not None and container.proc.poll() is None:
                container.stop()
            assert vsensor.stop() == 0
        assert numbered(vsensor.packets("image-node"), 7030) == set(range(2000))
        assert TEST_KEY not in container.log.read_text()


def test_without_net_raw_says_so_and_is_not_ready(image, netns_pair, tmp_path):
    """Without NET_RAW the capture cannot open: the log names the capability, the sensor stays
    up (an interface may still become capturable) but its readiness probe fails."""
    tx, rx = netns_pair
    with veth_pair(tx, rx):
        security = [a if a != "NET_RAW,NET_ADMIN" else "NET_ADMIN" for a in SECURITY]
        env = {**sensor_env("00" * 32), "OSSENSOR_METRICS_ADDRESS": ""}
        container = Container(rx, image, env, tmp_path / "sensor.log", security)
        try:
            container.wait_for("cannot capture on rx0")
            assert "needs CAP_NET_RAW" in container.log.read_text()
            time.sleep(2.5)  # the first status file is written
            probe = podman("exec", container.name, "ossensor", "health", check=False)
            assert probe.returncode == 1 and "not ready" in probe.stderr, probe
            assert podman("exec", container.name, "ossensor", "health", "--live",
                          check=False).returncode == 0
        finally:
            assert container.stop() == 0
