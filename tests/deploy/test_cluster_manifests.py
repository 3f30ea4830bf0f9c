"""Cluster mode in deploy/ checked offline: vSensor replicas and store workers as rendered by
the kustomization (deploy/cluster) and the chart (cluster.enabled), the certificate names
docs/cluster.md asks for, and deploy/nats/values.yaml against the NATS settings the cluster
tests run with.

The replicas' arguments go through the vSensor's own command-line parser, the certificate names
through a real TLS handshake (the vSensor's server context, the sensor's client context), and
the NATS settings through a real nats-server, so a renamed option, a name the certificate does
not cover or a size NATS reads differently fails here rather than in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import ssl
import subprocess
import time
import urllib.request
from typing import Any

import pytest
import trustme
import yaml
from ossensor_vsensor.cli import build_parser, cluster_settings, main
from ossensor_vsensor.cluster.connection import ClusterSettings
from ossensor_vsensor.tls import server_context

from ossensor_core.client.tls import tls_setting
from tests.helpers.manifests import (
    CHART,
    DEPLOY,
    REPO,
    documents,
    env_of,
    helm_template,
    pods,
    render,
)
from tests.helpers.nats import SERVER_SETTINGS, free_port, needs_nats

CLUSTER_SOURCES = ("kustomize-cluster", "helm-cluster")
NAMESPACE = "ossensor"
DOMAIN = "cluster.local"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {source: render(source) for source in CLUSTER_SOURCES}


def arguments(container: dict[str, Any]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (the manifests write every option that way)."""
    found = {}
    for arg in container["args"]:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            found[name] = value
    return found


def expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet makes of ``$(VAR)`` in an argument."""
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], text)


class Cluster:
    """The cluster-mode objects of one rendering, found by what they are, not by name."""

    def __init__(self, text: str) -> None:
        self.docs = documents(text)
        workloads = pods(text)
        assert not [k for k in workloads if k.startswith("Deployment/")], \
            "cluster mode has no single vSensor"
        sets = {k: v for k, v in workloads.items() if k.startswith("StatefulSet/")}
        (self.replicas, self.replica_pod), = [
            v for v in sets.values() if v[1]["spec"]["containers"][0]["args"][0] != "store"]
        (self.store, self.store_pod), = [
            v for v in sets.values() if v[1]["spec"]["containers"][0]["args"][0] == "store"]
        (self.daemonset, self.sensor_pod), = [
            v for k, v in workloads.items() if k.startswith("DaemonSet/")]
        self.services = {d["metadata"]["name"]: d for d in self.docs if d["kind"] == "Service"}

    def selecting(self, labels: dict[str, str], kind: str = "Service") -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind and
                (d["spec"].get("selector", {}).get("matchLabels", d["spec"].get("selector"))
                 or {}).items() <= labels.items()]

    def names(self) -> tuple[str, list[str]]:
        """The load-balanced name the sensors are given, and every replica's advertised name."""
        sensor_env = env_of(self.sensor_pod["spec"]["containers"][0])
        balanced = sensor_env["VSENSOR_HOSTNAME"]["value"]
        advertise = arguments(self.replica_pod["spec"]["containers"][0])["--advertise"]
        name = self.replicas["metadata"]["name"]
        direct = [expand(advertise, {"POD_NAME": f"{name}-{i}", "POD_NAMESPACE": NAMESPACE})
                  .rpartition(":")[0] for i in range(self.replicas["spec"]["replicas"])]
        return balanced, direct


@pytest.mark.parametrize("source", CLUSTER_SOURCES)
def test_replicas(source, rendered):
    cluster = Cluster(rendered[source])
    labels = cluster.replica_pod["metadata"]["labels"]
    assert cluster.replicas["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert cluster.replicas["spec"]["replicas"] >= 2
    assert cluster.replicas["spec"]["podManagementPolicy"] == "Parallel"
    # The sensors' Service (port 443, load-balanced) and the headless one of the StatefulSet
    # (the replicas' own names) both select the replicas, and nothing else does.
    services = cluster.selecting(labels)
    headless = cluster.services[cluster.replicas["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless in services
    (balanced,) = [s for s in services if s["spec"].get("clusterIP") != "None"]
    balanced_name, direct = cluster.names()
    assert balanced_name == f"{balanced['metadata']['name']}.{NAMESPACE}.svc.{DOMAIN}"
    assert balanced["spec"]["ports"][0]["port"] == 443
    (container,) = cluster.replica_pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert balanced["spec"]["ports"][0]["targetPort"] in ports
    args = arguments(container)
    env = env_of(container)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Each replica is named after its pod and advertises its pod's DNS name under the headless
    # Service, on the port it listens on.
    assert args["--replica"] == "$(POD_NAME)"
    listen_port = int(args["--listen"].rpartition(":")[2])
    assert listen_port in ports.values()
    assert args["--advertise"] == (f"$(POD_NAME).{headless['metadata']['name']}."
                                   f"$(POD_NAMESPACE).svc.{DOMAIN}:{listen_port}")
    assert all(name.endswith(f".{headless['metadata']['name']}.{NAMESPACE}.svc.{DOMAIN}")
               for name in direct)
    # The key from the sensors' Secret, the certificate from the Secret whose CA they trust.
    secrets = {d["metadata"]["name"] for d in cluster.docs if d["kind"] == "Secret"}
    assert env["VSENSOR_HMAC_KEY"]["valueFrom"]["secretKeyRef"]["name"] in secrets
    volumes = {v["name"]: v for v in cluster.replica_pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    tls = volumes[mounts[args["--tls-cert"].rpartition("/")[0]]]["secret"]["secretName"]
    sensor_volumes = {v["name"]: v for v in cluster.sensor_pod["spec"]["volumes"]}
    assert tls == sensor_volumes["vsensor-ca"]["secret"]["secretName"]
    assert args["--tls-key"].rpartition("/")[0] == args["--tls-cert"].rpartition("/")[0]
    # Nothing stored on a replica: the data folder is scratch space.
    assert "emptyDir" in volumes[mounts[args["--data-dir"]]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert cluster.replica_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The vSensor's own parser takes the arguments, and cluster mode accepts them.
    argv = [expand(a, {"POD_NAME": "r-0", "POD_NAMESPACE": NAMESPACE}) for a in container["args"]]
    settings = cluster_settings(build_parser().parse_args(argv))
    assert isinstance(settings, ClusterSettings) and settings.name == "r-0"
    assert settings.replicas == nats_values()["config"]["cluster"]["replicas"]
    assert settings.urls == (f"nats://nats.{NAMESPACE}.svc.{DOMAIN}:4222",)


@pytest.mark.parametrize("source", CLUSTER_SOURCES)
def test_store_workers(source, rendered):
    cluster = Cluster(rendered[source])
    labels = cluster.store_pod["metadata"]["labels"]
    assert cluster.store["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert cluster.services[cluster.store["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    (container,) = cluster.store_pod["spec"]["containers"]
    args = arguments(container)
    assert args["--worker"] == "$(POD_NAME)"
    assert env_of(container)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.name"
    assert args["--nats"] == arguments(cluster.replica_pod["spec"]["containers"][0])["--nats"]
    # The files on the pod's own volume, kept across restarts.
    (claim,) = cluster.store["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[args["--data-dir"]] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # It talks to NATS only: no key, no certificate.
    assert "VSENSOR_HMAC_KEY" not in env_of(container)
    assert not [v for v in cluster.store_pod["spec"].get("volumes", []) if "secret" in v]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert cluster.store_pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_store_arguments_are_the_store_commands():
    """Once ``ossensor-vsensor store`` exists, it knows every option the manifests pass."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["store", "--help"])
    if "--worker" not in out.getvalue():
        pytest.skip("ossensor-vsensor store is not in this tree yet")
    for source in CLUSTER_SOURCES:
        container = Cluster(render(source)).store_pod["spec"]["containers"][0]
        for option in arguments(container):
            assert option in out.getvalue(), (source, option)


@pytest.mark.parametrize("source", CLUSTER_SOURCES)
def test_disruption_budgets_and_spread(source, rendered):
    cluster = Cluster(rendered[source])
    for workload, pod in ((cluster.replicas, cluster.replica_pod),
                          (cluster.store, cluster.store_pod)):
        labels = pod["metadata"]["labels"]
        (budget,) = cluster.selecting(labels, "PodDisruptionBudget")
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= \
            labels.items()
        assert workload["spec"]["selector"]["matchLabels"] == \
            term["podAffinityTerm"]["labelSelector"]["matchLabels"]


def test_chart_cluster_values():
    text = helm_template("cluster.replicas=5", "cluster.storeWorkers=3",
                         "cluster.streamMaxBytes=8589934592", "cluster.antiAffinity=required",
                         "cluster.nats={nats://a:4222,tls://b:4222}",
                         "cluster.store.storage.size=50Gi", typed=("cluster.enabled=true",))
    cluster = Cluster(text)
    assert cluster.replicas["spec"]["replicas"] == 5 and cluster.store["spec"]["replicas"] == 3
    args = arguments(cluster.replica_pod["spec"]["containers"][0])
    assert args["--nats"] == "nats://a:4222,tls://b:4222"
    assert args["--nats-stream-max-bytes"] == "8589934592"
    assert arguments(cluster.store_pod["spec"]["containers"][0])["--nats"] == args["--nats"]
    (term,) = cluster.replica_pod["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    claim = cluster.store["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    # Off, explicitly or by default: single mode, exactly as without the cluster values.
    assert helm_template(typed=("cluster.enabled=false",)) == helm_template()
    single = documents(helm_template())
    assert not [d for d in single if d["kind"] in ("StatefulSet", "PodDisruptionBudget")]
    assert [d for d in single if d["kind"] == "Deployment"]


@pytest.mark.parametrize("values, message", [
    (("vsensor.enabled=false", "sensor.env.VSENSOR_HOSTNAME=v.example"), "needs vsensor.enabled"),
    (("cluster.antiAffinity=sometimes",), "preferred or required"),
])
def test_chart_refuses(values, message):
    done = subprocess.run(["helm", "template", "demo", str(CHART), "--set-string",
                           "hmac.key=Kx9secretHMACkey42", "--set", "cluster.enabled=true",
                           *[a for v in values for a in ("--set", v)]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr


@pytest.mark.parametrize("source", CLUSTER_SOURCES)
def test_nats_network_policy(source, rendered):
    """deploy/nats/networkpolicy.yaml lets the replicas and the store workers reach NATS's
    client port, and not the sensors (nor anything else of ours)."""
    cluster = Cluster(rendered[source])
    (policy,) = documents((DEPLOY / "nats" / "networkpolicy.yaml").read_text())
    (clients,) = [r for r in policy["spec"]["ingress"]
                  if [p["port"] for p in r.get("ports", [])] == [4222]]

    def admitted(pod: dict[str, Any]) -> bool:
        labels = pod["metadata"]["labels"]
        return any(peer["podSelector"]["matchLabels"].items() <= labels.items()
                   for peer in clients["from"])

    assert admitted(cluster.replica_pod) and admitted(cluster.store_pod)
    assert not admitted(cluster.sensor_pod)
    assert all(r.get("from") for r in policy["spec"]["ingress"]
               if 8222 not in [p["port"] for p in r["ports"]])


def test_no_nats_dependency():
    """NATS comes from its own chart, installed apart: ours could not be rendered offline."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "dependencies" not in chart
    assert not (CHART / "charts").exists() and not (CHART / "Chart.lock").exists()


# -- the certificate ---------------------------------------------------------------------------


async def handshakes(cert_file: str, key_file: str, ca_file: str,
                     names: list[str]) -> dict[str, str]:
    """name -> "ok" or the verification error, each from a real handshake between the vSensor's
    server context and the sensor's client context."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=server_context(cert_file, key_file))
    port = server.sockets[0].getsockname()[1]
    outcome = {}
    try:
        for name in names:
            try:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=tls_setting(ca_file, "", True),
                    server_hostname=name)
                writer.close()
                outcome[name] = "ok"
            except ssl.SSLCertVerificationError as exc:
                outcome[name] = exc.verify_message
    finally:
        server.close()
        await server.wait_closed()
    return outcome


@pytest.mark.parametrize("source", CLUSTER_SOURCES)
def test_certificate_names(source, rendered, tmp_path):
    """The two names docs/cluster.md asks the certificate for cover the load-balanced name and
    every replica's advertised one, for the sensor's TLS client; other names are refused."""
    cluster = Cluster(rendered[source])
    balanced, direct = cluster.names()
    headless = cluster.replicas["spec"]["serviceName"]
    sans = [balanced, f"*.{headless}.{NAMESPACE}.svc.{DOMAIN}"]
    if source == "kustomize-cluster":  # the names docs/cluster.md writes out
        doc = (REPO / "docs" / "cluster.md").read_text()
        assert all(f"`{name}`" in doc for name in sans), sans
    ca = trustme.CA()
    cert = ca.issue_cert(*sans)
    cert_file, key_file, ca_file = (tmp_path / n for n in ("tls.crt", "tls.key", "ca.crt"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    wrong = [f"{direct[0].partition('.')[0]}.{balanced}",  # under the wrong Service
             f"x.{direct[0]}"]  # a wildcard covers one label only
    outcome = asyncio.run(handshakes(str(cert_file), str(key_file), str(ca_file),
                                     [balanced, *direct, *wrong]))
    assert all(outcome[name] == "ok" for name in [balanced, *direct]), outcome
    assert all(outcome[name] != "ok" for name in wrong), outcome


# -- NATS --------------------------------------------------------------------------------------


def nats_values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "nats" / "values.yaml").read_text())


@needs_nats
def test_nats_values_are_the_tested_settings(tmp_path):
    """deploy/nats/values.yaml gives the NATS servers exactly tests/helpers/nats.py's
    SERVER_SETTINGS: its sizes written into a configuration as the NATS chart writes them
    (unquoted: the chart's ``<< size >>`` marks a raw value), read back from a real
    nats-server."""
    values = nats_values()["config"]
    assert values["cluster"]["enabled"] is True and values["cluster"]["replicas"] == 3
    jetstream = values["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"]
    monitor = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"""listen: 127.0.0.1:{free_port()}
http: 127.0.0.1:{monitor}
max_payload: {values["merge"]["max_payload"]}
jetstream {{
  store_dir: "{tmp_path / 'store'}"
  max_memory_store: {jetstream["memoryStore"]["maxSize"]}
  max_file_store: {jetstream["fileStore"]["maxSize"]}
}}
""")
    server = subprocess.Popen(["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, server.stderr.read().decode(errors="replace")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz",
                                            timeout=2) as answer:
                    varz = json.load(answer)
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not answer"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert varz["max_payload"] == SERVER_SETTINGS["max_payload"]
    assert varz["jetstream"]["config"]["max_memory"] == SERVER_SETTINGS["jetstream_max_memory"]
    assert varz["jetstream"]["config"]["max_storage"] == SERVER_SETTINGS["jetstream_max_file"]
    # The stream's default limit fits in the file store, and the store on its volume.
    assert ClusterSettings(("nats://x:4222",)).stream_max_bytes < \
        SERVER_SETTINGS["jetstream_max_file"]
    size = jetstream["fileStore"]["pvc"]["size"]
    assert size.endswith("Gi") and int(size[:-2]) << 30 > SERVER_SETTINGS["jetstream_max_file"]
