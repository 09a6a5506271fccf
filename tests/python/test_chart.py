"""The Helm chart, with the real helm: lint, render each value set, check every object against
the Kubernetes JSON schemas (kubernetes-validate, offline), and start the real server on the
lmserve.toml each set renders, with the variables Kubernetes injects for its Service. Also the
KServe ServingRuntime, as far as the schemas available offline reach.
"""
import json
import os
import re
import subprocess
import threading
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, _binary, serve
from lmserve.v1 import models_pb2, models_pb2_grpc

CHART = ROOT / "helm" / "lmserve"
KUBERNETES = "1.31.0"
VALUE_SETS = {
    "default": [],
    "gpu": ["values-gpu.yaml", "ci/gpu-values.yaml"],
    "hpa": ["ci/hpa-values.yaml"],
    "tls-auth": ["ci/tls-auth-values.yaml"],
    "routes": ["ci/routes-values.yaml"],
}
# Custom resources: no schema in the Kubernetes bundle.
CUSTOM_KINDS = {"ServiceMonitor"}


def helm() -> str:
    path = os.environ.get("TEST_HELM") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "lmserve" / "tools" / "helm-v4.3.2" / "helm")
    if not Path(path).is_file():
        raise RuntimeError(f"no helm at {path}; run `make helm`")
    return path


def values_args(name: str) -> list:
    return [arg for file in VALUE_SETS[name] for arg in ("-f", str(CHART / file))]


def render(name: str) -> list:
    output = subprocess.run(
        [helm(), "template", "lmserve", str(CHART), "--namespace", "inference",
         "--kube-version", KUBERNETES, *values_args(name)],
        check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def of_kind(docs: list, kind: str) -> list:
    return [doc for doc in docs if doc["kind"] == kind]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_strictly_clean(name):
    result = subprocess.run([helm(), "lint", "--strict", str(CHART), *values_args(name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_refuses_a_misspelled_value():
    result = subprocess.run([helm(), "template", "x", str(CHART), "--set", "server.readyWhn=all"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "readyWhn" in result.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_is_valid_kubernetes(name):
    docs = render(name)
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)

    [deployment] = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    assert not security["allowPrivilegeEscalation"] and pod["securityContext"]["runAsNonRoot"]
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    if name == "tls-auth":
        # The kubelet's gRPC probe speaks plaintext, so with TLS the probes ask the metrics port.
        assert {probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
                for probe in probes} == {"startupProbe": ("/health/ready", 9090),
                                         "readinessProbe": ("/health/ready", 9090),
                                         "livenessProbe": ("/health/live", 9090)}
    else:
        assert {probe: container[probe]["grpc"]["port"] for probe in probes} == dict.fromkeys(
            probes, 50051)
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    # The grace covers the drain delay and the grace for calls in flight (5 s + 10 s).
    assert pod["terminationGracePeriodSeconds"] >= 15
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/var/lib/lmserve", "/tmp", "/models", "/etc/lmserve/config"} <= mounts
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds

    if name == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert of_kind(docs, "PersistentVolumeClaim")
        assert 'required_provider = "cuda:0"' in config_of(docs)
    if name == "hpa":
        [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
        assert [metric["type"] for metric in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
        assert "replicas" not in deployment["spec"]
        assert any(service["spec"].get("clusterIP") == "None" for service in of_kind(docs, "Service"))
    if name == "tls-auth":
        secrets = {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
        assert secrets == {"lmserve-tls", "lmserve-keys"}
        assert "client_ca_file" in config_of(docs) and "keys_file" in config_of(docs)
        assert any(port["name"] == "admin" for port in container["ports"])


def test_a_route_change_keeps_the_pods_and_a_setting_change_restarts_them():
    """Routes reload in place, so the pods' config checksum leaves them out; anything else in
    lmserve.toml needs a restart, which a changed checksum makes."""
    def rendered(*sets: str) -> tuple:
        args = [arg for option in sets for arg in ("--set", option)]
        output = subprocess.run(
            [helm(), "template", "lmserve", str(CHART), *values_args("routes"), *args],
            check=True, capture_output=True, text=True).stdout
        docs = [doc for doc in yaml.safe_load_all(output) if doc]
        [deployment] = of_kind(docs, "Deployment")
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return checksum, config_of(docs)

    checksum, config = rendered()
    new_weights = rendered("routes.chat.arms[0].weight=50", "routes.chat.arms[1].weight=50")
    assert new_weights[1] != config and "weight = 50" in new_weights[1]
    assert new_weights[0] == checksum
    assert rendered("server.logFilter=debug")[0] != checksum


def render_with(*sets: str, name: str = "default") -> list:
    args = [arg for option in sets for arg in ("--set", option)]
    output = subprocess.run(
        [helm(), "template", "lmserve", str(CHART), *values_args(name), *args],
        check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def test_the_shared_pool_is_sized_from_the_pod_s_cpus_not_the_node_s():
    """Without a CPU limit the server would count every CPU of the node; the chart passes the
    pod's own: its limit, else its request, in whole CPUs."""
    def threads(*sets):
        line = next(line for line in config_of(render_with(*sets)).splitlines()
                    if line.strip().startswith("shared_threads"))
        return int(line.split("=")[1])
    assert threads() == 2
    assert threads("resources.requests.cpu=500m") == 1
    assert threads("resources.requests.cpu=1500m") == 2
    assert threads("resources.limits.cpu=3.5") == 4
    assert threads("runtime.sharedThreads=6") == 6
    assert threads("resources.requests.cpu=8") == 8


def test_a_budget_that_could_block_every_drain_is_left_out():
    assert of_kind(render_with(), "PodDisruptionBudget")
    assert not of_kind(render_with("replicaCount=1"), "PodDisruptionBudget")
    assert not of_kind(render_with("replicaCount=2", "podDisruptionBudget.minAvailable=2"),
                       "PodDisruptionBudget")
    # With autoscaling, the fewest replicas the autoscaler keeps decide.
    assert not of_kind(render_with("autoscaling.minReplicas=1", name="hpa"), "PodDisruptionBudget")
    assert of_kind(render_with(name="hpa"), "PodDisruptionBudget")


def test_gpu_rollouts_do_not_wait_for_a_spare_gpu_and_tls_ports_are_not_called_plaintext_grpc():
    def strategy(docs):
        [deployment] = of_kind(docs, "Deployment")
        return deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy(render("default")) == {"maxSurge": 1, "maxUnavailable": 0}
    assert strategy(render("gpu")) == {"maxSurge": 0, "maxUnavailable": 1}

    def app_protocols(docs):
        return {port.get("appProtocol") for service in of_kind(docs, "Service")
                for port in service["spec"]["ports"] if port["name"] == "grpc"}
    assert app_protocols(render("default")) == {"grpc"}
    assert app_protocols(render("tls-auth")) == {None}


def test_a_claim_the_chart_creates_can_be_filled_and_shared_by_every_replica():
    [claim] = of_kind(render("gpu"), "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def config_of(docs: list) -> str:
    [config_map] = of_kind(docs, "ConfigMap")
    return config_map["data"]["lmserve.toml"]


# What Kubernetes defines in every pod of the namespace for the release's Service "lmserve".
SERVICE_VARIABLES = {
    "LMSERVE_PORT": "tcp://10.96.0.10:50051",
    "LMSERVE_SERVICE_HOST": "10.96.0.10",
    "LMSERVE_SERVICE_PORT": "50051",
    "LMSERVE_SERVICE_PORT_GRPC": "50051",
    "LMSERVE_SERVICE_PORT_METRICS": "9090",
    "LMSERVE_PORT_50051_TCP": "tcp://10.96.0.10:50051",
    "LMSERVE_PORT_50051_TCP_PROTO": "tcp",
    "LMSERVE_PORT_50051_TCP_PORT": "50051",
    "LMSERVE_PORT_50051_TCP_ADDR": "10.96.0.10",
}


def certificates(folder: Path) -> dict:
    """A CA, a server certificate for localhost and a client certificate, with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name, subject in (("server", "localhost"), ("client", "client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={subject}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{subject},IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return {name: (folder / name).read_bytes() for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_server_starts_on_what_the_chart_renders(name, tmp_path):
    docs = render(name)
    config = tmp_path / "lmserve.toml"
    config.write_text(config_of(docs))
    # Only what differs between a pod and this machine: where the files are, and free ports.
    library = os.environ.get("ORT_DYLIB_PATH") or str(
        ROOT / ".cache" / "onnxruntime-1.31.1" / "libonnxruntime.so")
    env = dict(SERVICE_VARIABLES,
               ORT_DYLIB_PATH=library,
               LMSERVE_REPOSITORY__PATH=str(ROOT / "models" / "repository"),
               LMSERVE_STATE__PATH=str(tmp_path / "state" / "state.json"))
    if "gpu" in name:
        # No GPU here: the preset's settings load, with the CPU standing in for CUDA.
        env.update(LMSERVE_RUNTIME__EXECUTION_PROVIDERS='["cpu"]', LMSERVE_RUNTIME__REQUIRED_PROVIDER="cpu")
    credentials = None
    if name == "tls-auth":
        pem = certificates(tmp_path)
        for file, data in pem.items():
            (tmp_path / file).write_bytes(data)
        (tmp_path / "keys").write_text("admin 0123456789abcdef0123\n")
        env.update(LMSERVE_TLS__CERT_FILE=str(tmp_path / "server.crt"),
                   LMSERVE_TLS__KEY_FILE=str(tmp_path / "server.key"),
                   LMSERVE_TLS__CLIENT_CA_FILE=str(tmp_path / "ca.crt"),
                   LMSERVE_AUTH__KEYS_FILE=str(tmp_path / "keys"),
                   LMSERVE_SERVER__ADMIN_ADDR="127.0.0.1:0")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pem["ca.crt"], private_key=pem["client.key"],
            certificate_chain=pem["client.crt"])
    process = subprocess.Popen(
        [str(_binary()), "serve", "--config", str(config), "--grpc-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0"],
        cwd=tmp_path, env=dict(os.environ, **env, LMSERVE_SERVER__DRAIN_DELAY_MS="0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The chart logs JSON: only JSON lines on stderr, the ports in the listening event.
        listening = None
        for line in process.stderr:
            event = json.loads(line)
            if event.get("message") == "lmserve listening":
                listening = event
                break
        assert listening, "the server exited before listening"
        # Keep reading, so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
        address = listening["grpc"]
        metrics = listening["metrics"]
        channel = (grpc.secure_channel(address, credentials,
                                       options=[("grpc.ssl_target_name_override", "localhost")])
                   if credentials else grpc.insecure_channel(address))
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            for _ in range(600):
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                import time
                time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
            # Tools that cannot speak gRPC ask the metrics port.
            with urllib.request.urlopen(f"http://{metrics}/health/ready", timeout=5) as ready:
                assert ready.status == 200
            with urllib.request.urlopen(f"http://{metrics}/health/live", timeout=5) as live:
                assert live.status == 200
            if name == "routes":
                route = models_pb2_grpc.ModelsStub(channel).GetRoute(models_pb2.GetRouteRequest(name="chat"))
                assert [arm.weight for arm in route.arms] == [90, 10]
                assert route.source == models_pb2.ROUTE_SOURCE_CONFIG
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_the_image_finds_onnx_runtime_whatever_config_it_runs(dockerfile):
    """The chart and KServe's runtime start the image with configurations that do not name the
    library, so the image's environment must: where the image's own config puts it."""
    image_config = (ROOT / "deploy" / "lmserve.image.toml").read_text()
    [library] = re.findall(r'^ort_library = "([^"]+)"', image_config, re.M)
    text = (ROOT / "deploy" / dockerfile).read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert f"ENV ORT_DYLIB_PATH={library}" in final_stage
    # `make dist` fetches the ONNX Runtime wheel with `python3 -m pip download`.
    build_stage = text.split("\nFROM ")[1]
    assert "python3-pip" in build_stage
    assert "ort_library" not in config_of(render("default"))


def test_the_kserve_serving_runtime_runs_lmserve_as_documented():
    runtime = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    # It claims the protocol the same port serves (tests/python/test_tritonclient.py).
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    formats = {entry["name"] for entry in runtime["spec"]["supportedModelFormats"]}
    assert service["spec"]["predictor"]["model"]["modelFormat"]["name"] in formats
    # The containers are core Kubernetes: checked as the containers of a Pod.
    for container in runtime["spec"]["containers"]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
               "spec": {"containers": [container]}}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
        # Every flag it passes is one `lmserve serve` takes.
        help_text = subprocess.run([str(_binary()), "serve", "--help"], check=True,
                                   capture_output=True, text=True).stdout
        known = set(re.findall(r"--[a-z][a-z-]+", help_text))
        used = {arg.split("=")[0] for arg in container["args"] if arg.startswith("--")}
        assert used <= known, used - known
        assert container["args"][0] == "serve"
