"""The `local` stack (RTX 5090 host) under Pulumi mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pulumi
import pytest
import yaml

from dreamseed.policy import load_policies
from infra import images

from .conftest import HOST_KEY, INSTANCE, SECRETS, TUNNEL_KEY, RecordingMocks, Runner, plain_occurrences, secret_occurrences

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = "docker:index/container:Container"
SEED = load_policies(ROOT / "policies")


def containers(mocks: RecordingMocks) -> dict[str, dict]:
    return {r.inputs["name"]: r.inputs for r in mocks.of_type(CONTAINER)}


def env_of(inputs: dict) -> list[str]:
    envs = inputs.get("envs", [])
    return envs["value"] if isinstance(envs, dict) and "value" in envs else envs


@pytest.fixture
def local(run_stack: Runner):
    return run_stack("local")


def test_every_catalog_backend_on_the_host_gets_a_vllm_container(local) -> None:
    mocks, _ = local
    found = containers(mocks)
    for name, backend in SEED.catalog.backends.items():
        if backend.host != "rtx5090":
            assert f"dreamseed-{name}" not in found  # the 70B is the remote stack's
            continue
        command = found[f"dreamseed-{name}"]["command"]
        port = str(int(backend.url.rsplit(":", 1)[1]))  # type: ignore[union-attr]
        # vLLM loads the pre-quantized checkpoint and serves it under the catalog's model id.
        assert backend.checkpoint and backend.checkpoint != backend.model
        assert command[:8] == ["--model", backend.checkpoint, "--served-model-name", backend.model, "--port", port,
                               "--max-model-len", str(backend.context_length)]
        assert "--quantization" not in command  # no load-time quantization: its 16-bit peak does not fit
        i = command.index("--gpu-memory-utilization")
        assert float(command[i + 1]) == backend.gpu_memory_utilization
        assert command[-len(backend.args):] == backend.args


def test_a_new_catalog_backend_gets_its_own_container(run_stack: Runner, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    catalog = yaml.safe_load((policies / "backends.yaml").read_text(encoding="utf-8"))
    # Room for it on the card: general takes fewer requests at once, so its KV cache (and share) shrinks.
    catalog["backends"]["general"]["gpu_memory_utilization"] = 0.29
    catalog["backends"]["general"]["max_concurrency"] = 2
    catalog["backends"]["tiny"] = {
        "url": "http://127.0.0.1:8005", "url_env": "DREAMSEED_TINY_URL", "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "context_length": 1024, "max_concurrency": 4, "host": "rtx5090", "gpu_memory_utilization": 0.05,
        "image": "vllm/vllm-openai:v0.11.0",
        "memory": {"weights_gib": 0.93, "weights_dtype": "bf16", "kv_cache_kib_per_token": 12, "activations_gib": 0.5},
    }
    (policies / "backends.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True), encoding="utf-8")
    mocks, _ = run_stack("local", {"dreamseed:policiesDir": str(policies)})
    tiny = containers(mocks)["dreamseed-tiny"]
    assert tiny["command"][:4] == ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--port", "8005"]  # no checkpoint: the model
    assert "DREAMSEED_TINY_URL=http://dreamseed-tiny:8005" in env_of(containers(mocks)["dreamseed-proxy"])


def test_vllm_containers_and_the_gpu_exporter_request_the_gpu_and_nothing_else_does(local) -> None:
    mocks, _ = local
    for name, inputs in containers(mocks).items():
        gpu = inputs.get("deviceRequests")
        if name in {"dreamseed-general", "dreamseed-code", "dreamseed-fast"}:
            assert gpu == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
            assert "gpus" not in inputs  # one GPU setting only
            assert inputs["ipcMode"] == "host"
            assert inputs["volumes"] == [{"volumeName": "dreamseed-hf-cache", "containerPath": "/root/.cache/huggingface"}]
            assert inputs["healthcheck"]["tests"][-1].endswith("/health', timeout=5)")
        elif name == "dreamseed-gpu-exporter":  # reads the GPUs' counters; takes no memory from vLLM
            assert gpu == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
            # DCGM's default fields need no capability (its profiling ones, which would, GeForce cards lack).
            assert "capabilities" not in inputs and not inputs.get("ports")
        else:
            assert gpu is None, name


def test_prometheus_scrapes_the_gpu_and_the_remote_70b_and_alerts_go_to_the_webhook(run_stack: Runner) -> None:
    mocks, _ = run_stack("local", {"dreamseed:alertWebhookUrl": "https://hooks.example/T0/SECRET-token"})
    found = containers(mocks)
    uploads = {u["file"]: u["content"] for u in found["dreamseed-prometheus"]["uploads"]}
    config = yaml.safe_load(uploads["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs["gpu"] == [{"targets": ["dreamseed-gpu-exporter:9400"]}]
    # The 70B through its tunnel, in a job of its own: an auto-stopped rented host is not a page.
    assert jobs["vllm-remote"] == [{"targets": ["dreamseed-tunnel-general70:8000"],
                                    "labels": {"backend": "general70", "on_demand": "false"}}]
    assert "embeddings" not in jobs  # the seed embeds in-process
    assert config["alerting"] == {"alertmanagers": [{"static_configs": [{"targets": ["dreamseed-alertmanager:9093"]}]}]}
    uploads_of_alertmanager = found["dreamseed-alertmanager"]["uploads"]
    assert secret_occurrences(uploads_of_alertmanager, "https://hooks.example/T0/SECRET-token") == 1  # holds a token
    assert plain_occurrences(uploads_of_alertmanager, "SECRET-token") == 0
    assert not found["dreamseed-alertmanager"].get("ports")
    with pytest.raises(pulumi.RunError) as bad:  # refused at preview, and the value is not echoed (a secret)
        run_stack("local", {"dreamseed:alertWebhookUrl": "hooks.example/SECRET-token"})
    assert "dreamseed:alertWebhookUrl must be an http(s) URL" in str(bad.value) and "SECRET" not in str(bad.value)
    without, _ = run_stack("local")  # no webhook: alerts show in Alertmanager and Grafana only
    (bare,) = containers(without)["dreamseed-alertmanager"]["uploads"]
    assert "webhook_configs" not in yaml.safe_load(bare["content"])["receivers"][0]


def test_on_demand_coder_is_created_stopped_for_the_scaler(local) -> None:
    mocks, outputs = local
    code = containers(mocks)["dreamseed-code"]
    assert code["start"] is False and code["mustRun"] is False and code["restart"] == "no"
    for always_on in ("dreamseed-general", "dreamseed-fast"):
        inputs = containers(mocks)[always_on]
        assert inputs.get("start", True) is True and inputs["restart"] == "unless-stopped"
    assert outputs["onDemandContainers"] == (["dreamseed-code"], False)


def test_the_proxy_reaches_docker_only_through_the_gate(local) -> None:
    mocks, _ = local
    found = containers(mocks)
    proxy, gate = found["dreamseed-proxy"], found["dreamseed-docker-gate"]
    # The internet-facing proxy holds no Docker socket: it is not root on the host.
    assert not proxy.get("volumes") and "DOCKER_HOST=tcp://dreamseed-docker-gate:2375" in env_of(proxy)
    holders = [name for name, inputs in found.items()
               if any(v.get("hostPath") == "/var/run/docker.sock" for v in inputs.get("volumes", []))]
    assert holders == ["dreamseed-docker-gate"]
    assert gate["volumes"] == [{"hostPath": "/var/run/docker.sock", "containerPath": "/var/run/docker.sock",
                                "readOnly": True}]
    # socket-proxy's own user, in the group that owns the socket (root:docker 0660): tests/stacks/test_docker_gate.py.
    assert gate["user"] == "65534:998"
    command = gate["command"]
    assert "-allowfrom=dreamseed-proxy" in command and not gate.get("ports")  # not published, one client
    assert r"-allowGET=/v1\.[0-9]{2}/containers/(dreamseed\-code)/json" in command
    assert r"-allowPOST=/v1\.[0-9]{2}/containers/(dreamseed\-code)/(start|stop)" in command
    assert not [flag for flag in command if flag.startswith(("-allowDELETE", "-allowPUT", "-allowHEAD"))]


def test_the_proxy_runs_as_an_unprivileged_user_from_its_image_digest(local) -> None:
    mocks, _ = local
    (built,) = mocks.of_type("docker:index/image:Image")
    # By digest, so a rebuilt image under the same tag replaces the container.
    assert containers(mocks)["dreamseed-proxy"]["image"] == f"dreamseed-proxy@sha256:{'ab' * 32}"
    assert built.inputs["imageName"] == "dreamseed-proxy:0.1.0"
    dockerfile = (ROOT / "infra" / "proxy.Dockerfile").read_text(encoding="utf-8")
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and "useradd --system --uid 10001 dreamseed" in dockerfile


def test_only_the_proxy_is_published_beyond_localhost(local) -> None:
    mocks, _ = local
    published = {name: inputs.get("ports", []) for name, inputs in containers(mocks).items()}
    assert published["dreamseed-proxy"] == [{"internal": 8080, "external": 8080, "ip": "0.0.0.0"}]
    # /metrics and the probes have a listener of their own that nothing publishes: Prometheus scrapes it.
    command = containers(mocks)["dreamseed-proxy"]["command"]
    assert command[command.index("--metrics-port") + 1] == "9464" and "--metrics-host" in command
    assert containers(mocks)["dreamseed-proxy"]["healthcheck"]["tests"][-1].endswith(
        "'http://127.0.0.1:9464/healthz', timeout=5)")
    for name, ports in published.items():
        if name != "dreamseed-proxy":
            assert all(port["ip"] == "127.0.0.1" for port in ports), name
    assert published["dreamseed-postgres"] == [] and published["dreamseed-prometheus"] == []
    assert published["dreamseed-grafana"] == [{"internal": 3000, "external": 3000, "ip": "127.0.0.1"}]
    assert "dreamseed-embeddings" not in published  # the seed's rag.yaml embeds in-process: no server to run
    for name, inputs in containers(mocks).items():
        assert inputs["networksAdvanced"][0]["name"] == "dreamseed", name


def test_images_are_pinned(local) -> None:
    mocks, _ = local
    pulled = [r.inputs["name"] for r in mocks.of_type("docker:index/remoteImage:RemoteImage")]
    built = [r.inputs["imageName"] for r in mocks.of_type("docker:index/image:Image")]
    assert set(pulled) == {"vllm/vllm-openai:v0.11.0", images.POSTGRES_PGVECTOR, images.PROMETHEUS, images.GRAFANA,
                           images.TUNNEL, images.SOCKET_PROXY, images.ALERTMANAGER, images.GPU_EXPORTER}
    assert images.is_pinned(images.EMBEDDINGS)  # declared only when rag.yaml embeds through a server
    assert built == ["dreamseed-proxy:0.1.0"]
    for image in pulled + built:
        assert images.is_pinned(image), image
    assert not images.is_pinned("vllm/vllm-openai:latest") and not images.is_pinned("postgres")


def test_secrets_stay_secret_in_every_input_and_output(local) -> None:
    mocks, outputs = local
    for record in mocks.resources:
        for name, value in SECRETS.items():
            assert plain_occurrences(record.inputs, value) == 0, f"{name} in plain text in {record.type} {record.name}"
    proxy = containers(mocks)["dreamseed-proxy"]
    for name in ("postgresPassword", "proxyApiKeys", "proxyAdminKey", "vllmApiKey"):
        assert secret_occurrences(proxy["envs"], SECRETS[name]) == 1, name
    assert secret_occurrences(containers(mocks)["dreamseed-general"]["envs"], SECRETS["hfToken"]) == 1
    # The tunnel holds the remote stack's restricted key, never the login key.
    tunnel_env = containers(mocks)["dreamseed-tunnel-general70"]["envs"]
    assert secret_occurrences(tunnel_env, TUNNEL_KEY) == 1 and secret_occurrences(tunnel_env, SECRETS["sshPrivateKey"]) == 0
    value, is_secret = outputs["databaseUrl"]
    assert is_secret and SECRETS["postgresPassword"] in value
    for key, (value, is_secret) in outputs.items():
        if not is_secret:
            assert not any(s in str(value) for s in SECRETS.values()), key


def test_remote_70b_is_wired_through_the_stack_reference_and_a_tunnel(local) -> None:
    mocks, _ = local
    reference = mocks.of_type("pulumi:pulumi:StackReference")
    assert [r.name for r in reference] == ["organization/dreamseed/remote70b"]
    tunnel = containers(mocks)["dreamseed-tunnel-general70"]
    env = env_of(tunnel)
    assert f"SSH_HOST={INSTANCE['ip']}" in env and "SSH_USER=ubuntu" in env and "REMOTE_PORT=8000" in env
    assert f"SSH_HOST_KEY={HOST_KEY}" in env  # pinned: StrictHostKeyChecking=yes against this key only
    script = tunnel["command"][-1]
    assert "StrictHostKeyChecking=yes" in script and "accept-new" not in script
    assert tunnel["networksAdvanced"][0]["aliases"] == ["general70"] and not tunnel.get("ports")
    proxy_env = env_of(containers(mocks)["dreamseed-proxy"])
    assert "DREAMSEED_GENERAL70_URL=http://dreamseed-tunnel-general70:8000" in proxy_env
    assert f"DREAMSEED_GENERAL70_API_KEY={SECRETS['vllmApiKey']}" in proxy_env
    for name in ("general", "code", "fast"):
        port = {"general": 8000, "code": 8001, "fast": 8002}[name]
        assert f"DREAMSEED_{name.upper()}_URL=http://dreamseed-{name}:{port}" in proxy_env


def test_without_a_remote_stack_there_is_no_tunnel(run_stack: Runner) -> None:
    mocks, _ = run_stack("local", {"dreamseed:remoteStack": ""})
    assert not mocks.of_type("pulumi:pulumi:StackReference")
    assert "dreamseed-tunnel-general70" not in containers(mocks)
    assert not any(e.startswith("DREAMSEED_GENERAL70") for e in env_of(containers(mocks)["dreamseed-proxy"]))


def test_proxy_gets_every_policy_file_and_prometheus_scrapes_the_catalog(local) -> None:
    mocks, _ = local
    uploads = {u["file"]: u["content"] for u in containers(mocks)["dreamseed-proxy"]["uploads"]}
    for path in (ROOT / "policies").glob("*.yaml"):
        assert uploads[f"/app/policies/{path.name}"] == path.read_text(encoding="utf-8")
    prometheus_files = {u["file"]: u["content"] for u in containers(mocks)["dreamseed-prometheus"]["uploads"]}
    prometheus = yaml.safe_load(prometheus_files["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job["static_configs"] for job in prometheus["scrape_configs"]}
    assert jobs["dreamseed-proxy"] == [{"targets": ["dreamseed-proxy:9464"]}]  # the internal listener
    assert {c["labels"]["backend"]: (c["targets"][0], c["labels"]["on_demand"]) for c in jobs["vllm"]} == {
        "code": ("dreamseed-code:8001", "true"), "fast": ("dreamseed-fast:8002", "false"),
        "general": ("dreamseed-general:8000", "false")}
    assert prometheus["rule_files"] == ["rules.yml"]
    alerts = [r["alert"] for g in yaml.safe_load(prometheus_files["/etc/prometheus/rules.yml"])["groups"]
              for r in g["rules"] if "alert" in r]
    assert "DreamSeedErrorBudgetBurnFast" in alerts and "DreamSeedRemoteBackendUnreachable" in alerts
    grafana_files = {u["file"]: u["content"] for u in containers(mocks)["dreamseed-grafana"]["uploads"]}
    datasource = yaml.safe_load(grafana_files["/etc/grafana/provisioning/datasources/prometheus.yaml"])
    assert datasource["datasources"][0]["url"] == "http://dreamseed-prometheus:9090"
    assert '"uid": "dreamseed"' in grafana_files["/var/lib/grafana/dashboards/dreamseed.json"]
    postgres = containers(mocks)["dreamseed-postgres"]
    assert "CREATE EXTENSION IF NOT EXISTS vector;" in postgres["uploads"][0]["content"]
    assert postgres["volumes"][0]["volumeName"] == "dreamseed-postgres-data"


def test_components_parent_their_children(local) -> None:
    mocks, _ = local
    for record in mocks.of_type(CONTAINER) + mocks.of_type("docker:index/remoteImage:RemoteImage"):
        assert "$dreamseed:index:" in record.parent, f"{record.name} is not parented to a component: {record.parent}"
    kinds = {r.type for r in mocks.resources if r.type.startswith("dreamseed:index:")}
    assert kinds == {"dreamseed:index:VllmBackend", "dreamseed:index:VectorDatabase", "dreamseed:index:Monitoring",
                     "dreamseed:index:ProxyService", "dreamseed:index:SshTunnel", "dreamseed:index:DockerGate"}


def refused_edit(run_stack: Runner, tmp_path: Path, file: str, old: str, new: str) -> pytest.ExceptionInfo:
    """The seed policies with one edit in `file`, which the local stack must refuse at preview."""
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    text = (policies / file).read_text(encoding="utf-8")
    assert old in text
    (policies / file).write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("local", {"dreamseed:policiesDir": str(policies)})
    return refused


def test_memory_plan_is_exported_and_an_oversubscribed_catalog_is_refused(local, run_stack: Runner, tmp_path: Path) -> None:
    _, outputs = local
    plan, _ = outputs["gpuMemoryPlan"]
    assert plan["gpuMemoryGib"] == 31.8 and plan["budgetGib"] == pytest.approx(30.21)
    assert {n: (b["onDemand"], b["shareGib"]) for n, b in plan["backends"].items()} == {
        "general": (False, 12.4), "code": (True, 8.27), "fast": (False, 6.36)}
    assert all(b["kvTokens"] >= b["kvTokensNeeded"] and b["headroomGib"] > 0 for b in plan["backends"].values())
    assert plan["alwaysOnGib"] == 20.76 and plan["worstCaseGib"] == 30.03

    refused = refused_edit(run_stack, tmp_path, "backends.yaml", "gpu_memory_utilization: 0.20",
                           "gpu_memory_utilization: 0.65")
    message = str(refused.value)
    assert "backends.yaml" in message and "hosts.rtx5090" in message
    assert "always-on backends need 35.1 GiB per GPU" in message

    # A vLLM server the stack deploys must say what it needs, or the plan cannot check it.
    policies = tmp_path / "undeclared"
    shutil.copytree(ROOT / "policies", policies)
    catalog = yaml.safe_load((policies / "backends.yaml").read_text(encoding="utf-8"))
    del catalog["backends"]["fast"]["memory"]
    (policies / "backends.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True), encoding="utf-8")
    with pytest.raises(pulumi.RunError) as undeclared:
        run_stack("local", {"dreamseed:policiesDir": str(policies)})
    assert "backends.yaml: fast on host 'rtx5090' give no `memory`" in str(undeclared.value)


def test_a_load_time_quantized_coder_is_refused_at_preview(run_stack: Runner, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    catalog = yaml.safe_load((policies / "backends.yaml").read_text(encoding="utf-8"))
    code = catalog["backends"]["code"]
    del code["checkpoint"]  # the bf16 original, quantized by vLLM while loading
    code["memory"] = {"weights_gib": 14.2, "weights_dtype": "bf16", "kv_cache_kib_per_token": 56}
    code["args"] = ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    (policies / "backends.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("local", {"dreamseed:policiesDir": str(policies)})
    assert ("backends.code.args: --quantization fp8 quantizes while loading, so vLLM first puts the 14.2 GiB of 16-bit "
            "weights on the GPU, but only 9.4 GiB are free when it starts next to general, fast") in str(refused.value)


def test_scale_policy_must_name_the_container_the_stack_declares(run_stack: Runner, tmp_path: Path) -> None:
    assert SEED.scale.backends["code"].actuator.container == "dreamseed-code"  # type: ignore[union-attr]
    refused = refused_edit(run_stack, tmp_path, "scale.yaml", "container: dreamseed-code", "container: vllm-coder")
    assert "backends.code.actuator.container is 'vllm-coder'" in str(refused.value)
    assert "'dreamseed-code'" in str(refused.value)


def test_data_volumes_are_protected_from_destroy_unless_lifted_on_purpose(local, run_stack: Runner) -> None:
    mocks, outputs = local
    protected = {r.inputs["name"] for r in mocks.resources if r.protect}
    # Documents, model weights and metrics history: what a re-deploy cannot recreate.
    assert protected == {"dreamseed-postgres-data", "dreamseed-hf-cache", "dreamseed-prometheus-data"}
    assert all(r.type == "docker:index/volume:Volume" for r in mocks.resources if r.protect)
    assert outputs["protectedVolumes"][0] == sorted(protected, key=["dreamseed-postgres-data", "dreamseed-hf-cache",
                                                                    "dreamseed-prometheus-data"].index)
    assert "protectData false" in outputs["removeProtectedVolumes"][0]
    lifted, lifted_outputs = run_stack("local", {"dreamseed:protectData": "false"})
    assert not any(r.protect for r in lifted.resources) and lifted_outputs["protectedVolumes"] == ([], False)


def test_a_public_proxy_without_client_keys_is_refused_at_preview(run_stack: Runner) -> None:
    # The proxy itself refuses 0.0.0.0 without keys and would exit at once after `pulumi up`.
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("local", {"dreamseed:proxyApiKeys": None})
    message = str(refused.value)
    assert "0.0.0.0:8080" in message and "no client API keys" in message
    assert "pulumi config set --secret dreamseed:proxyApiKeys" in message
    mocks, _ = run_stack("local", {"dreamseed:proxyApiKeys": None, "dreamseed:proxyBindAddress": "127.0.0.1"})
    assert "dreamseed-proxy" in containers(mocks)  # on loopback only, keys are optional


def test_vllm_servers_on_one_gpu_start_one_after_another_each_waiting_for_health(local) -> None:
    mocks, _ = local
    servers = {r.inputs["name"]: r for r in mocks.of_type("docker:index/container:Container")
               if r.inputs["name"] in ("dreamseed-general", "dreamseed-fast", "dreamseed-code")}
    general, fast, code = servers["dreamseed-general"], servers["dreamseed-fast"], servers["dreamseed-code"]
    # Always-on servers: `pulumi up` waits for each to be healthy, and fast is created after general is.
    assert general.inputs["wait"] is True and fast.inputs["wait"] is True
    assert general.inputs["waitTimeout"] >= 900
    assert any(d.endswith("::vllm-general") for d in fast.dependencies), fast.dependencies
    assert not any(d.endswith(("::vllm-fast", "::vllm-code")) for d in general.dependencies)  # general goes first
    # The on-demand coder is created stopped: nothing to wait for, and the scaler starts it later.
    assert not code.inputs.get("wait") and code.inputs["start"] is False


def test_the_embedding_server_runs_only_when_rag_yaml_embeds_through_one_and_with_its_model(
        run_stack: Runner, tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    text = (policies / "rag.yaml").read_text(encoding="utf-8")
    server = text.replace("  kind: fastembed\n", "  kind: openai\n  url_env: DREAMSEED_EMBEDDINGS_URL\n  dim: 384\n")
    assert server != text
    (policies / "rag.yaml").write_text(server, encoding="utf-8")
    mocks, _ = run_stack("local", {"dreamseed:policiesDir": str(policies)})
    embeddings = containers(mocks)["dreamseed-embeddings"]
    assert embeddings["command"][:2] == ["--model-id", "sentence-transformers/all-MiniLM-L6-v2"]  # rag.yaml's model
    assert "DREAMSEED_EMBEDDINGS_URL=http://dreamseed-embeddings:8003" in env_of(containers(mocks)["dreamseed-proxy"])

    own = server.replace("  url_env: DREAMSEED_EMBEDDINGS_URL\n", "  url: http://embeddings.internal:8003\n")
    (policies / "rag.yaml").write_text(own, encoding="utf-8")  # the operator's own server: nothing to run
    mocks, _ = run_stack("local", {"dreamseed:policiesDir": str(policies)})
    assert "dreamseed-embeddings" not in containers(mocks)


def test_retired_embedding_keys_are_refused_not_ignored(run_stack: Runner) -> None:
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("local", {"dreamseed:embeddingsModel": "BAAI/bge-m3"})
    message = str(refused.value)
    assert "dreamseed:embeddingsModel is no longer read" in message and "policies/rag.yaml" in message
    assert "pulumi config rm dreamseed:embeddingsModel" in message


def two_hosts(tmp_path: Path, docker: str | None = "ssh://gpu@10.0.0.2") -> Path:
    """The seed's policies with general on two replicas: one on the stack's host, one on a second box."""
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    catalog = yaml.safe_load((policies / "backends.yaml").read_text(encoding="utf-8"))
    catalog["hosts"]["rtx5090-b"] = {**catalog["hosts"]["rtx5090"], "description": "a second RTX 5090 box",
                                     **({"docker": docker} if docker else {})}
    general = catalog["backends"]["general"]
    general["replicas"] = [{"url": general.pop("url"), "url_env": general.pop("url_env"), "host": general.pop("host")},
                           {"url": "http://10.0.0.2:8010", "host": "rtx5090-b"}]
    (policies / "backends.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return policies


def test_replicas_on_two_hosts_get_a_container_each_through_each_hosts_docker_engine(run_stack: Runner,
                                                                                   tmp_path: Path) -> None:
    mocks, _ = run_stack("local", {"dreamseed:policiesDir": str(two_hosts(tmp_path))})
    found = containers(mocks)
    assert "dreamseed-general" not in found
    here, there = found["dreamseed-general-1"], found["dreamseed-general-2"]
    backend = SEED.catalog.backends["general"]
    for inputs, port in ((here, "8000"), (there, "8010")):  # the catalog's model, limits and share on each
        assert inputs["command"][:6] == ["--model", backend.checkpoint, "--served-model-name", backend.model, "--port", port]
        assert inputs["deviceRequests"] == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
    # The second box's container goes through its own Docker engine, published on its own address
    # for the proxy; the first stays on loopback and is reached by container name.
    engines = {r.name: r.inputs.get("host") for r in mocks.of_type("pulumi:providers:docker")}
    assert engines["docker-rtx5090-b"] == "ssh://gpu@10.0.0.2"
    second = mocks.get(CONTAINER, "vllm-general-2")
    first = mocks.get(CONTAINER, "vllm-general-1")
    assert "docker-rtx5090-b" in second.provider and "docker-rtx5090-b" not in first.provider
    assert (there["ports"][0]["ip"], there["ports"][0]["external"]) == ("10.0.0.2", 8010)
    assert here["ports"][0]["ip"] == "127.0.0.1"
    networks = [r for r in mocks.of_type("docker:index/network:Network") if r.name == "network-rtx5090-b"]
    assert networks and "docker-rtx5090-b" in networks[0].provider
    assert "DREAMSEED_GENERAL_URL=http://dreamseed-general-1:8000" in env_of(found["dreamseed-proxy"])
    # Prometheus scrapes each replica where the proxy reaches it, labelled as the proxy labels it.
    uploads = {u["file"]: u["content"] for u in found["dreamseed-prometheus"]["uploads"]}
    jobs = {job["job_name"]: job["static_configs"] for job in
            yaml.safe_load(uploads["/etc/prometheus/prometheus.yml"])["scrape_configs"]}
    replicas = {c["labels"].get("replica"): (c["targets"][0], c["labels"]["backend"]) for c in jobs["vllm"]}
    assert replicas["general#1"] == ("dreamseed-general-1:8000", "general")
    assert replicas["general#2"] == ("10.0.0.2:8010", "general")


def test_a_replica_host_the_stack_cannot_reach_is_refused_by_name(run_stack: Runner, tmp_path: Path) -> None:
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("local", {"dreamseed:policiesDir": str(two_hosts(tmp_path, docker=None))})
    assert "hosts.rtx5090-b runs replicas (general#2) but has no `docker`" in str(refused.value)
