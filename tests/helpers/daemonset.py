"""The sensor exactly as the DaemonSet runs it, read from ``deploy/base/sensor-daemonset.yaml``.

The container's entry point (the image's), ``args``, every ``env`` entry (``valueFrom`` resolved as
the kubelet does) and the capabilities of its security context; only what genuinely differs
outside a cluster is overridden (:func:`overrides`). Used by the simulated cluster
(``tests/e2e/test_cluster.py``) and the soak benchmark (``bench/soak.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.cli import TEST_KEY
from tests.helpers.cluster import VSENSOR_ADDRESS, VSENSOR_PORT, Node
from tests.helpers.sensor import Sensor

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "deploy" / "base" / "sensor-daemonset.yaml"
#: Secret name and key -> value, as the test hands them to the vSensor (deploy/base/secret.yaml).
SECRETS = {("ossensor-hmac", "key"): TEST_KEY}
#: The image's ``ENV`` (Dockerfile) that matters outside the image: the entry point is the
#: console script beside this interpreter, as it is in ``/opt/ossensor/bin`` there.
IMAGE_ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def entrypoint() -> list[str]:
    """The image's ``ENTRYPOINT`` (exec form), from the Dockerfile."""
    (line,) = [line for line in (REPO / "Dockerfile").read_text().splitlines()
               if line.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


def sensor_container() -> dict[str, Any]:
    """The DaemonSet's only container."""
    (daemonset,) = [d for d in yaml.safe_load_all(DAEMONSET.read_text())
                    if d and d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container


def pod_environment(container: dict[str, Any], node_name: str,
                    secrets: Mapping[tuple[str, str], str] = SECRETS) -> dict[str, str]:
    """The container's environment as the kubelet sets it on ``node_name``. Anything this test
    does not know how to resolve fails: a sensor started without it would not be the
    DaemonSet's."""
    assert "envFrom" not in container, "envFrom: not resolved by this test"
    env: dict[str, str] = {}
    for item in container["env"]:
        name = item["name"]
        assert set(item) <= {"name", "value", "valueFrom"}, f"{name}: {item} not understood"
        source = item.get("valueFrom")
        if source is None:
            env[name] = str(item.get("value", ""))
        elif list(source) == ["fieldRef"] and source["fieldRef"]["fieldPath"] == "spec.nodeName":
            env[name] = node_name
        elif list(source) == ["secretKeyRef"] and \
                (source["secretKeyRef"]["name"], source["secretKeyRef"]["key"]) in secrets:
            env[name] = secrets[source["secretKeyRef"]["name"], source["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"{name}: valueFrom {source} is not resolved by this test")
    return env


def overrides(folder: Path, ca_file: Path) -> dict[str, str]:
    """What genuinely differs from a real cluster, in one place."""
    return {
        # The test vSensor on the bridge instead of the Service's cluster DNS name.
        "VSENSOR_HOSTNAME": VSENSOR_ADDRESS,
        "VSENSOR_PORT": str(VSENSOR_PORT),
        # A trustme CA that signed the test vSensor's certificate, instead of the Secret volume.
        "VSENSOR_CA_FILE": str(ca_file),
        # Folders of the test standing in for the two emptyDir volumes.
        "OSSENSOR_CONFIG_PATH": str(folder / "etc" / "ossensor.cfg"),
        "OSSENSOR_SPOOL_DIR": str(folder / "spool"),
    }


def capabilities_wrapper(container: dict[str, Any]) -> list[str]:
    """``setpriv`` applying the container's security context: every capability dropped but
    those added, and no privilege escalation (the sensor runs as UID 0, as there)."""
    security = container["securityContext"]
    assert security["runAsUser"] == 0 and security["capabilities"]["drop"] == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False
    keep = ",".join(["-all", *(f"+{c.lower()}" for c in security["capabilities"]["add"])])
    return ["setpriv", "--no-new-privs", "--inh-caps=-all", f"--bounding-set={keep}", "--"]


class DaemonSetSensor(Sensor):
    """The sensor of one node, started from the DaemonSet's container; its log is the
    container's standard output."""

    def __init__(self, node: Node, tmp_path: Path, ca_file: Path,
                 process_env: Mapping[str, str] | None = None) -> None:
        """``process_env``: variables of the process that are no setting of the sensor (where
        its code comes from, diagnostics); a variable the DaemonSet sets is refused."""
        container = sensor_container()
        folder = tmp_path / node.name
        env = pod_environment(container, node.name)
        changed = overrides(folder, ca_file)
        assert set(changed) <= set(env), "an override of something the DaemonSet does not set"
        env.update(changed)
        extra = dict(process_env or {})
        assert not set(extra) & set(env), f"the DaemonSet sets {sorted(set(extra) & set(env))}"
        env.update(extra)
        for volume in ("OSSENSOR_SPOOL_DIR", "OSSENSOR_CONFIG_PATH"):
            path = Path(env[volume])
            (path if volume == "OSSENSOR_SPOOL_DIR" else path.parent).mkdir(parents=True)
        self.env = {**IMAGE_ENV, **env}
        self.node = node
        self.container = container
        self.log = folder / "sensor.log"
        self.pid1 = False
        command = entrypoint()
        executable = shutil.which(command[0], path=IMAGE_ENV["PATH"])
        assert executable, f"{command[0]} is not installed (pip install -e .)"
        with open(self.log, "w") as log:
            self.proc = node.ns.popen(*capabilities_wrapper(container), executable,
                                      *command[1:], *container["args"], env=self.env,
                                      stdout=log, stderr=subprocess.PIPE, text=True)

    def probe(self, kind: str = "readinessProbe") -> subprocess.CompletedProcess:
        """The kubelet's exec probe: the container's command, in the node, with its env."""
        return self.node.ns.exec(*self.container[kind]["exec"]["command"], env=self.env,
                                 check=False)

    def wait_ready(self, capturing: str = "", absent: str = "", timeout: float = 10) -> None:
        """Until the readiness probe passes and names (or no longer names) an interface: the
        status file it reads is rewritten every 2 s."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.probe()
            said = done.stdout + done.stderr
            if done.returncode == 0 and capturing in said and not (absent and absent in said):
                return
            assert time.monotonic() < deadline, f"{self.node.name}: {said}"
            time.sleep(0.5)

    def metrics(self) -> str:
        """``/metrics`` at ``OSSENSOR_METRICS_ADDRESS``, fetched inside the node."""
        url = f"http://{self.env['OSSENSOR_METRICS_ADDRESS']}/metrics"
        return self.node.ns.exec(sys.executable, "-c", "import sys, urllib.request; "
                                 f"sys.stdout.write(urllib.request.urlopen({url!r}, "
                                 "timeout=5).read().decode())").stdout

    def capturing(self) -> int:
        """``ossensor_capturing_interfaces`` now."""
        return int(float(re.search(r"^ossensor_capturing_interfaces (\S+)$", self.metrics(),
                                   re.MULTILINE).group(1)))

    def wait_capturing(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.capturing()) != count:
            assert time.monotonic() < deadline, f"{self.node.name}: capturing {now}, not {count}"
            time.sleep(0.1)


def issue_certificate(folder: Path, *hosts: str) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) files for a vSensor at ``hosts`` (default: the bridge address),
    from a throwaway trustme CA: the stand-in for the DaemonSet's ``vsensor-ca`` Secret
    volume."""
    import trustme

    authority = trustme.CA()
    ca_file, cert_file, key_file = (folder / n for n in ("ca.pem", "cert.pem", "key.pem"))
    authority.cert_pem.write_to_path(str(ca_file))
    issued = authority.issue_cert(*(hosts or (VSENSOR_ADDRESS,)))
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file
