"""The `k8s` stack's program: the catalog's GPU backends on the cluster's GPU nodes, the proxy in
front of them, Postgres with pgvector, the network policies and the monitoring objects, all in one
namespace; the remote 70B through the remote70b stack's tunnel outputs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from dreamseed.policy import PolicyError, load_policies
from infra.config import K8sConfig

from ..program import checked_memory_plan, plan_summary
from .common import MODEL_PORT, model_server_name
from .database import VectorDatabase, VectorDatabaseArgs
from .embeddings import NAME as EMBEDDINGS_NAME
from .embeddings import EmbeddingServer, EmbeddingServerArgs
from .model_server import ModelServer, ModelServerArgs
from .monitoring import Monitoring, MonitoringArgs
from .network import NetworkPolicies, NetworkPoliciesArgs
from .proxy import EdgeProxy, EdgeProxyArgs, policy_files
from .tunnel import RemoteTunnel, RemoteTunnelArgs


def checked_policy_files(config: K8sConfig, scaled: dict[str, str], discovered: list[str]) -> dict[str, str]:
    """The ConfigMap's files, loaded as the proxy will load them (scale.yaml rewritten for the cluster)."""
    files = policy_files(config.policies_dir, scaled, discovered)
    with tempfile.TemporaryDirectory() as directory:
        for name, text in files.items():
            (Path(directory) / name).write_text(text, encoding="utf-8")
        try:
            load_policies(directory)
        except PolicyError as exc:
            raise pulumi.RunError(f"the policies the k8s stack would ship are invalid:\n{exc}") from None
    return files


def build_k8s(config: K8sConfig) -> dict[str, Any]:
    policies = config.policies
    plan = checked_memory_plan(policies, config.gpu_host)
    namespace = k8s.core.v1.Namespace("namespace", metadata={"name": config.namespace,
                                                             "labels": {"app.kubernetes.io/part-of": "dreamseed"}})
    ns = namespace.metadata["name"]
    in_namespace = pulumi.ResourceOptions(depends_on=[namespace])
    hf_token = k8s.core.v1.Secret("hf-token", metadata={"name": "dreamseed-hf-token", "namespace": ns},
                                  string_data={"HF_TOKEN": config.hf_token}, opts=in_namespace)

    servers: dict[str, str] = {}  # backend -> Deployment name
    env: dict[str, pulumi.Input[str]] = {}
    for name, backend in policies.catalog.backends.items():
        if config.gpu_host not in backend.hosts():
            continue
        if backend.replicas is not None:
            raise pulumi.RunError(
                f"backends.yaml: backend {name!r} lists replicas by URL; on the cluster a backend is one Deployment: "
                "give it one `url_env` and scale the Deployment (docs/kubernetes.md, \"Scale a backend\")")
        if backend.url_env is None:
            raise pulumi.RunError(f"backend {name!r} needs `url_env` in backends.yaml: the proxy reaches it by its "
                                  "Service's name")
        server = ModelServer(f"model-{name}", ModelServerArgs(
            name=name, backend=backend, namespace=ns, hf_token_secret=hf_token.metadata["name"],
            storage_class=config.storage_class, cache_gib=config.model_cache_gib, runtime_class=config.runtime_class),
            opts=in_namespace)
        servers[name] = model_server_name(name)
        env[backend.url_env] = server.url

    # As on the local stack: an embedding server only when rag.yaml embeds through one whose URL the
    # deployment supplies; only the proxy may reach it (NetworkPolicies, below).
    embedder = policies.rag.embedder
    embedding_servers: list[str] = []
    if embedder.kind == "openai" and embedder.url_env is not None:
        embeddings = EmbeddingServer("embeddings", EmbeddingServerArgs(
            namespace=ns, model=embedder.model, hf_token_secret=hf_token.metadata["name"]), opts=in_namespace)
        env[embedder.url_env] = embeddings.url
        embedding_servers.append(EMBEDDINGS_NAME)

    database = VectorDatabase("postgres", VectorDatabaseArgs(namespace=ns, password=config.postgres_password,
                                                             storage_class=config.storage_class,
                                                             size_gib=config.database_gib), opts=in_namespace)
    secret_env: dict[str, pulumi.Input[str]] = {"DATABASE_URL": database.url}
    if config.proxy_api_keys is not None:
        secret_env["DREAMSEED_API_KEYS"] = config.proxy_api_keys
    if config.proxy_admin_key is not None:
        secret_env["DREAMSEED_ADMIN_KEY"] = config.proxy_admin_key
    if config.remote_stack:
        remote = pulumi.StackReference(config.remote_stack)
        for name, backend in policies.catalog.backends.items():
            if name in servers or not backend.hosts():
                continue
            tunnel = RemoteTunnel(f"tunnel-{name}", RemoteTunnelArgs(
                namespace=ns, alias=name, ssh_host=remote.require_output("publicIp"),
                ssh_user=remote.require_output("sshUser"), tunnel_private_key=remote.require_output("tunnelPrivateKey"),
                ssh_host_key=remote.require_output("sshHostKey"), remote_port=remote.require_output("port")),
                opts=in_namespace)
            if backend.url_env:
                env[backend.url_env] = tunnel.url
            if backend.api_key_env:
                secret_env[backend.api_key_env] = remote.require_output("apiKey")

    scaled = {name: servers[name] for name in policies.scale.backends if name in servers}
    proxy = EdgeProxy("proxy", EdgeProxyArgs(
        namespace=ns, image=config.proxy_image, policies=checked_policy_files(config, scaled, sorted(servers)), env=env,
        secret_env=secret_env, scaled_deployments=sorted(scaled.values()), replicas=config.proxy_replicas),
        opts=in_namespace)
    NetworkPolicies("network", NetworkPoliciesArgs(namespace=ns, model_servers=sorted(servers.values()),
                                                   monitoring_namespace=config.monitoring_namespace,
                                                   embedding_servers=embedding_servers), opts=in_namespace)
    if config.monitoring:
        Monitoring("monitoring", MonitoringArgs(namespace=ns, policies=policies, gpu_host=config.gpu_host,
                                                model_servers=servers, release_label=config.prometheus_release),
                   opts=in_namespace)
    return {
        "namespace": ns,
        "proxyUrl": f"http://dreamseed-proxy.{config.namespace}.svc:8080",
        "policyHash": proxy.policy_hash,
        "modelServers": {name: f"http://{server}.{config.namespace}.svc:{MODEL_PORT}" for name, server in servers.items()},
        "onDemandDeployments": sorted(scaled.values()),
        "gpuMemoryPlan": plan_summary(plan),
    }
