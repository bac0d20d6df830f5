"""The `k8s` stack under Pulumi mocks: every object it declares validates against the official
Kubernetes API schemas (kubernetes-validate) and the Prometheus Operator's CRDs (vendored in
tests/data/crds/), and says what the catalog says; the scaler's Role allows exactly what the
kubernetes actuator sends (checked against the fake API server's record of a real start and stop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from support import ROOT
from tests.stacks.conftest import SECRET_SIG, SECRETS, RecordingMocks, Runner, plain_occurrences

K8S_VERSION = "1.33.0"  # a current release that kubernetes-validate carries the schemas of
CRDS = ROOT / "tests" / "data" / "crds"


def manifest(record: Any) -> dict[str, Any]:
    """A recorded resource's inputs as the manifest Kubernetes would receive, secrets unwrapped."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            if SECRET_SIG in value:
                return plain(value.get("value"))
            return {k: plain(v) for k, v in value.items() if k != "__defaults"}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    inputs = plain(record.inputs)
    return {k: v for k, v in inputs.items()}


def kubernetes_objects(mocks: RecordingMocks) -> list[dict[str, Any]]:
    found = []
    for record in mocks.resources:
        if not record.type.startswith("kubernetes:"):
            continue
        found.append(manifest(record))
    return found


@pytest.fixture
def k8s(run_stack: Runner) -> tuple[RecordingMocks, dict[str, Any]]:
    return run_stack("k8s")


def crd_schema(kind: str) -> dict[str, Any]:
    plural = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}[kind]
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_every_object_validates_against_kubernetes_and_its_crd(k8s: tuple[RecordingMocks, dict[str, Any]]) -> None:
    mocks, _ = k8s
    objects = kubernetes_objects(mocks)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "PrometheusRule", "Role", "RoleBinding", "Secret", "Service",
                     "ServiceAccount", "ServiceMonitor", "StatefulSet"], kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            # The CRD's patterns are Go regular expressions ((?i) mid-pattern), which Python's `re`
            # refuses to compile as a schema check; the instance is still checked against every field.
            jsonschema.Draft7Validator(crd_schema(obj["kind"])).validate(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught_by_the_same_validation() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
                                                                                "spec": {"containers": [{"name": "c"}]}},
                           "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(crd_schema("PrometheusRule")).validate(
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {},
             "spec": {"groups": [{"rules": []}]}})


def by_kind(mocks: RecordingMocks, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in kubernetes_objects(mocks) if o["kind"] == kind}


def test_the_catalogs_gpu_backends_are_deployments_with_gpus_probes_and_headless_services(
        k8s: tuple[RecordingMocks, dict[str, Any]]) -> None:
    mocks, outputs = k8s
    deployments, services = by_kind(mocks, "Deployment"), by_kind(mocks, "Service")
    general, code = deployments["dreamseed-general"], deployments["dreamseed-code"]
    assert general["spec"]["replicas"] == 1 and code["spec"]["replicas"] == 0  # the coder stands at 0 until asked
    container = general["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["image"] == "vllm/vllm-openai:v0.11.0"
    assert container["args"][:4] == ["--model", "RedHatAI/Mistral-7B-Instruct-v0.3-FP8", "--served-model-name",
                                     "mistralai/Mistral-7B-Instruct-v0.3"]
    assert "--gpu-memory-utilization" in container["args"] and "0.39" in container["args"]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert services["dreamseed-general"]["spec"]["clusterIP"] == "None"
    assert "dreamseed-general70" not in deployments  # the 70B is on the rented host: a tunnel instead
    assert deployments["dreamseed-tunnel-general70"]["spec"]["replicas"] == 1
    assert outputs["onDemandDeployments"][0] == ["dreamseed-code"]
    assert outputs["gpuMemoryPlan"][0]["host"] == "rtx5090"


def test_the_proxy_rolls_on_a_policy_change_and_keeps_one_pod_through_a_drain(
        run_stack: Runner, tmp_path: Path) -> None:
    import shutil

    mocks, outputs = run_stack("k8s")
    proxy = by_kind(mocks, "Deployment")["dreamseed-proxy"]
    assert proxy["spec"]["replicas"] >= 2
    assert by_kind(mocks, "PodDisruptionBudget")["dreamseed-proxy"]["spec"]["minAvailable"] == 1
    maps = [n for n in by_kind(mocks, "ConfigMap") if n.startswith("dreamseed-proxy-policies-")]
    assert len(maps) == 1 and maps[0].endswith(outputs["policyHash"][0])
    volumes = proxy["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "policies", "configMap": {"name": maps[0]}}]
    shipped = by_kind(mocks, "ConfigMap")[maps[0]]["data"]
    assert set(shipped) >= {"backends.yaml", "routing.yaml", "rag.yaml", "scale.yaml"}
    assert yaml.safe_load(shipped["scale.yaml"])["backends"]["code"]["actuator"] == {
        "kind": "kubernetes", "deployment": "dreamseed-code"}
    catalog = yaml.safe_load(shipped["backends.yaml"])["backends"]
    assert {name: b.get("discover") for name, b in catalog.items()} == {
        "general": "dns", "code": "dns", "fast": "dns", "general70": None}  # each pod behind a headless Service
    env = {e["name"]: e["value"] for e in proxy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DREAMSEED_GENERAL_URL"] == "http://dreamseed-general:8000"
    assert env["DREAMSEED_GENERAL70_URL"] == "http://dreamseed-tunnel-general70:8000"

    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    routing = policies / "routing.yaml"
    routing.write_text(routing.read_text(encoding="utf-8").replace("chars_over: 2000", "chars_over: 3000"))
    _, changed = run_stack("k8s", {"dreamseed:policiesDir": str(policies)})
    assert changed["policyHash"][0] != outputs["policyHash"][0]  # a new ConfigMap name: the pods roll


def test_secrets_stay_secret(k8s: tuple[RecordingMocks, dict[str, Any]]) -> None:
    mocks, _ = k8s
    for record in mocks.resources:
        for name in ("postgresPassword", "proxyApiKeys", "hfToken", "proxyAdminKey"):
            assert plain_occurrences(record.inputs, SECRETS[name]) == 0, (record.type, record.name, name)


def test_only_the_proxy_reaches_the_model_servers_and_the_database(k8s: tuple[RecordingMocks, dict[str, Any]]) -> None:
    mocks, _ = k8s
    policies = by_kind(mocks, "NetworkPolicy")
    assert policies["dreamseed-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    proxy_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dreamseed-proxy",
                                                  "app.kubernetes.io/component": "proxy",
                                                  "app.kubernetes.io/part-of": "dreamseed"}}}
    database = policies["dreamseed-postgres-from-proxy"]["spec"]
    assert database["ingress"] == [{"from": [proxy_pods], "ports": [{"port": 5432, "protocol": "TCP"}]}]
    general = policies["dreamseed-general-from-proxy"]["spec"]
    assert proxy_pods in general["ingress"][0]["from"] and general["ingress"][0]["ports"][0]["port"] == 8000


def test_the_prometheus_rule_carries_the_local_stacks_rules(k8s: tuple[RecordingMocks, dict[str, Any]]) -> None:
    from dreamseed.policy import load_policies
    from infra.monitoring import alert_rules

    mocks, _ = k8s
    rule = by_kind(mocks, "PrometheusRule")["dreamseed-rules"]
    assert rule["spec"] == yaml.safe_load(alert_rules(load_policies(ROOT / "policies"), "rtx5090"))
    monitors = by_kind(mocks, "ServiceMonitor")
    relabel = {r["targetLabel"]: r["replacement"] for r in monitors["dreamseed-code"]["spec"]["endpoints"][0]["relabelings"]}
    assert relabel == {"job": "vllm", "backend": "code", "on_demand": "true"}  # what the rules select on


def test_the_scalers_role_allows_exactly_what_the_actuator_sends(k8s: tuple[RecordingMocks, dict[str, Any]],
                                                                 tmp_path: Path) -> None:
    from dreamseed.policy import KubernetesActuator
    from dreamseed.scaling.actuators import KubernetesDeployment
    from fake_kubernetes import FakeKubernetes

    mocks, _ = k8s
    (role,) = by_kind(mocks, "Role").values()
    allowed = {(verb, resource, name) for rule in role["rules"] for verb in rule["verbs"]
               for resource in rule["resources"] for name in rule["resourceNames"]}
    assert all(rule["apiGroups"] == ["apps"] for rule in role["rules"])
    fake = FakeKubernetes("token", deployments={"dreamseed-code": {"replicas": 0, "version": 1},
                                                "dreamseed-general": {"replicas": 1, "version": 1}}, role=allowed)
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("token")
    (account / "namespace").write_text("dreamseed")
    environ = {"DREAMSEED_KUBERNETES_API": fake.url, "DREAMSEED_KUBERNETES_SERVICE_ACCOUNT": str(account)}

    async def scenario() -> None:
        deployment = KubernetesDeployment(KubernetesActuator(deployment="dreamseed-code"), environ)
        await deployment.start()
        await deployment.running()
        await deployment.stop()
        await deployment.aclose()

    try:
        asyncio.run(scenario())
    finally:
        fake.close()
    assert set(fake.calls) == allowed  # every permission used, and nothing else asked for
    binding = by_kind(mocks, "RoleBinding")["dreamseed-proxy-scaler"]
    assert binding["subjects"][0]["name"] == "dreamseed-proxy" and binding["roleRef"]["name"] == role["metadata"]["name"]
    assert json.dumps(role).count("deployments/scale") == 1


def test_the_embedding_server_runs_when_rag_yaml_embeds_through_one_and_only_the_proxy_reaches_it(
        run_stack: Runner, tmp_path: Path) -> None:
    import shutil

    mocks, _ = run_stack("k8s")
    assert "dreamseed-embeddings" not in by_kind(mocks, "Deployment")  # the seed embeds in the proxy's process
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    rag = policies / "rag.yaml"
    rag.write_text(rag.read_text(encoding="utf-8").replace(
        "  kind: fastembed\n", "  kind: openai\n  url_env: DREAMSEED_EMBEDDINGS_URL\n  dim: 384\n"), encoding="utf-8")
    mocks, _ = run_stack("k8s", {"dreamseed:policiesDir": str(policies)})
    server = by_kind(mocks, "Deployment")["dreamseed-embeddings"]
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--model-id", "sentence-transformers/all-MiniLM-L6-v2"]  # rag.yaml's model
    assert "resources" not in container  # on the CPU: the GPUs stay with the catalog's models
    for obj in kubernetes_objects(mocks):
        if obj["metadata"]["name"] == "dreamseed-embeddings":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    proxy = by_kind(mocks, "Deployment")["dreamseed-proxy"]
    env = {e["name"]: e.get("value") for e in proxy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DREAMSEED_EMBEDDINGS_URL"] == "http://dreamseed-embeddings:8003"
    allowed = by_kind(mocks, "NetworkPolicy")["dreamseed-embeddings-from-proxy"]["spec"]
    assert allowed["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "dreamseed-embeddings"
    assert allowed["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "dreamseed-proxy"
