"""The deployment manifests as the tests read them: kustomize and helm output, pods, the variables the code reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import yaml

from ossensor_core.client.tls import connection_settings
from ossensor_core.pipeline.config import CORE_SETTINGS
from ossensor_core.pipeline.loading import GROUPS, installed_plugins

REPO = Path(__file__).resolve().parents[2]


DEPLOY = REPO / "deploy"


CHART = DEPLOY / "helm" / "ossensor"


KEY = "Kx9secretHMACkey42"


GUIDE_VARIABLES = ("VSENSOR_HOSTNAME", "VSENSOR_HMAC_KEY", "VSENSOR_PORT",
                   "OSSENSOR_NETWORK_DEVICE", "OSSENSOR_CONFIG_PATH", "OSSENSOR_DEBUG",
                   "ANTIGENA_ENABLED", "ANTIGENA_TIME_PERIOD", "NETWORK_DEVICE_EXCLUDELIST",
                   "NETWORK_DEVICE_INCLUDELIST", "NETWORK_DEVICE_ANY", "BPF",
                   "OSSENSOR_CAPTURE_BACKEND")


FROM_POD = {"VSENSOR_HMAC_KEY": "secretKeyRef", "OSSENSOR_NAME": "fieldRef"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bash scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def helm_template(*values: str, typed: tuple[str, ...] = ()) -> str:
    """The chart rendered with ``values`` as strings (``--set-string``) and ``typed`` as YAML
    values (``--set``: ``cluster.enabled=false`` is false, not the string "false")."""
    sets = [arg for value in ("hmac.key=" + KEY, *values) for arg in ("--set-string", value)]
    sets += [arg for value in typed for arg in ("--set", value)]
    return run(tool("helm"), "template", "demo", str(CHART), "--namespace", "ossensor", *sets)


#: Every way the manifests are rendered: the kustomizations and the chart, in single mode and in
#: cluster mode (docs/cluster.md).
SOURCES = ("kustomize", "helm", "kustomize-cluster", "helm-cluster")


def render(source: str) -> str:
    """One of :data:`SOURCES`, rendered."""
    if source.startswith("kustomize"):
        folder = "cluster" if source.endswith("-cluster") else "base"
        return run(tool("kubectl"), "kustomize", str(DEPLOY / folder))
    return helm_template(typed=("cluster.enabled=true",) if source.endswith("-cluster") else ())


def pods(text: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """kind/name -> (workload, pod template) of every workload."""
    return {f"{d['kind']}/{d['metadata']['name']}": (d, d["spec"]["template"])
            for d in documents(text) if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet")}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def code_variables() -> dict[str, Any]:
    """Every environment variable the sensor reads, from the code: the core settings and the
    settings the built-in plugins declare, with their defaults."""
    found = {s.variable(None): s.default for s in CORE_SETTINGS}
    core_group = connection_settings()  # the core's own group: the vSensor TLS settings
    found.update({s.variable(core_group.plugin): s.default for s in core_group.settings})
    for group in GROUPS:
        for info in installed_plugins(group):
            if not info.target.startswith("ossensor_plugins."):
                continue
            module_name, _, attribute = info.target.partition(":")
            obj = import_module(module_name)
            for part in filter(None, attribute.split(".")):
                obj = getattr(obj, part)
            declare = getattr(obj, "ossensor_settings", None)
            if callable(declare):
                settings_group = declare()
                for setting in settings_group.settings:
                    found[setting.variable(settings_group.plugin)] = setting.default
    return found

