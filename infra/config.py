"""Typed stack configuration: every key of Pulumi.<stack>.yaml, read in one place.

Secrets are only ever read with `require_secret`/`get_secret`, so they stay Pulumi secrets
in every resource input and output they reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pulumi

from dreamseed.policy import Policies, PolicyError, load_policies

ROOT = Path(__file__).resolve().parent.parent


def load_catalog_policies(config: pulumi.Config) -> Policies:
    directory = ROOT / (config.get("policiesDir") or "policies")
    try:
        return load_policies(directory)
    except PolicyError as exc:
        # RunError makes Pulumi print the message alone, without a Python traceback.
        raise pulumi.RunError(f"policies in {directory} are invalid:\n{exc}") from None


@dataclass(frozen=True)
class LocalConfig:
    policies: Policies
    docker_host: str
    # The group that owns the Docker socket on that host (the gate joins it); None: read it from the
    # socket when the Docker host is this machine.
    docker_socket_gid: int | None
    gpu_host: str
    proxy_port: int
    proxy_bind_address: str
    grafana_port: int
    protect_data: bool
    remote_stack: str | None
    hf_token: pulumi.Output[str]
    postgres_password: pulumi.Output[str]
    grafana_admin_password: pulumi.Output[str]
    proxy_api_keys: pulumi.Output[str] | None
    proxy_admin_key: pulumi.Output[str] | None
    # Where Alertmanager sends alerts (a webhook: Slack, a pager...); unset, they show in Grafana only.
    alert_webhook_url: pulumi.Output[str] | None

    @classmethod
    def load(cls) -> LocalConfig:
        config = pulumi.Config()
        retired = [key for key in ("embeddings", "embeddingsModel") if config.get(key) is not None]
        if retired:
            # Removed keys would otherwise be ignored without a word: say where their meaning went.
            raise pulumi.RunError(
                f"stack config {', '.join('dreamseed:' + k for k in retired)} is no longer read: the embedding server "
                "follows policies/rag.yaml (declared when embedder.kind is openai with url_env, serving "
                "embedder.model). Remove it: pulumi config rm " + " ".join("dreamseed:" + k for k in retired))
        remote_stack = config.get("remoteStack") or None
        webhook = config.get("alertWebhookUrl")  # the plain value, only to check its shape here
        if webhook is not None and (urlsplit(webhook).scheme not in ("http", "https") or not urlsplit(webhook).hostname):
            # Alertmanager would refuse its configuration and restart forever: say so at preview.
            raise pulumi.RunError("dreamseed:alertWebhookUrl must be an http(s) URL, e.g. "
                                  "https://hooks.slack.com/services/...; it is not one")
        return cls(
            policies=load_catalog_policies(config),
            docker_host=config.get("dockerHost") or "unix:///var/run/docker.sock",
            docker_socket_gid=config.get_int("dockerSocketGid"),
            gpu_host=config.get("gpuHost") or "rtx5090",
            proxy_port=config.get_int("proxyPort") or 8080,
            proxy_bind_address=config.get("proxyBindAddress") or "0.0.0.0",
            grafana_port=config.get_int("grafanaPort") or 3000,
            # The volumes with data a re-deploy cannot recreate (documents, model weights, metrics
            # history) are protected unless this is set to false.
            protect_data=config.get_bool("protectData") is not False,
            remote_stack=remote_stack,
            hf_token=config.require_secret("hfToken"),
            postgres_password=config.require_secret("postgresPassword"),
            grafana_admin_password=config.require_secret("grafanaAdminPassword"),
            proxy_api_keys=config.get_secret("proxyApiKeys"),
            proxy_admin_key=config.get_secret("proxyAdminKey"),
            alert_webhook_url=config.get_secret("alertWebhookUrl"),
        )


def non_negative(config: pulumi.Config, key: str, default: float) -> float:
    value = config.get_float(key)
    if value is None:
        return default
    if value < 0:
        raise pulumi.RunError(f"dreamseed:{key} must be 0 (off) or more, not {value:g}")
    return value


@dataclass(frozen=True)
class RemoteConfig:
    policies: Policies
    gpu_host: str
    lambda_api_url: str
    region: str
    instance_type: str
    instance_name: str
    # A Lambda persistent filesystem (in `region`) holding the Hugging Face cache, so a new instance
    # does not download the weights again while billed; "" for none.
    file_system_name: str
    # The instance terminates itself after this long without requests, and at most this long after
    # it booted (0: never); see infra/scripts/idle_watchdog.py.
    idle_minutes: float
    max_lifetime_hours: float
    ssh_key_name: str
    ssh_user: str
    lambda_api_key: pulumi.Output[str]
    ssh_private_key: pulumi.Output[str]
    hf_token: pulumi.Output[str]
    vllm_api_key: pulumi.Output[str]

    @classmethod
    def load(cls) -> RemoteConfig:
        config = pulumi.Config()
        return cls(
            policies=load_catalog_policies(config),
            gpu_host=config.get("gpuHost") or "lambda-2xa100",
            lambda_api_url=config.get("lambdaApiUrl") or "https://cloud.lambda.ai/api/v1",
            region=config.get("region") or "us-west-2",
            instance_type=config.get("instanceType") or "gpu_2x_a100",
            file_system_name="dreamseed-models" if config.get("fileSystemName") is None else config.get("fileSystemName") or "",
            idle_minutes=non_negative(config, "idleMinutes", 60),
            max_lifetime_hours=non_negative(config, "maxLifetimeHours", 24),
            instance_name=config.get("instanceName") or "dreamseed-70b",
            ssh_key_name=config.require("sshKeyName"),
            ssh_user=config.get("sshUser") or "ubuntu",
            lambda_api_key=config.require_secret("lambdaApiKey"),
            ssh_private_key=config.require_secret("sshPrivateKey"),
            hf_token=config.require_secret("hfToken"),
            vllm_api_key=config.require_secret("vllmApiKey"),
        )


@dataclass(frozen=True)
class K8sConfig:
    """Pulumi.k8s.yaml: the `k8s` stack (docs/kubernetes.md)."""

    policies: Policies
    policies_dir: Path
    namespace: str
    # The catalog host whose GPU the cluster's GPU nodes have: its memory plan is the one checked.
    gpu_host: str
    proxy_image: str
    proxy_replicas: int
    storage_class: str | None
    model_cache_gib: int
    database_gib: int
    runtime_class: str | None
    monitoring: bool
    monitoring_namespace: str
    prometheus_release: str
    remote_stack: str | None
    hf_token: pulumi.Output[str]
    postgres_password: pulumi.Output[str]
    proxy_api_keys: pulumi.Output[str] | None
    proxy_admin_key: pulumi.Output[str] | None

    @classmethod
    def load(cls) -> K8sConfig:
        config = pulumi.Config()
        replicas = config.get_int("proxyReplicas") or 2
        if replicas < 2:
            raise pulumi.RunError("dreamseed:proxyReplicas must be 2 or more: the PodDisruptionBudget keeps one up "
                                  "while a node drains, which one replica cannot")
        return cls(
            policies=load_catalog_policies(config),
            policies_dir=ROOT / (config.get("policiesDir") or "policies"),
            namespace=config.get("namespace") or "dreamseed",
            gpu_host=config.get("gpuHost") or "rtx5090",
            proxy_image=config.require("proxyImage"),
            proxy_replicas=replicas,
            storage_class=config.get("storageClass"),
            model_cache_gib=config.get_int("modelCacheGib") or 100,
            database_gib=config.get_int("databaseGib") or 20,
            runtime_class=config.get("runtimeClass"),
            monitoring=config.get_bool("monitoring") is not False,
            monitoring_namespace=config.get("monitoringNamespace") or "monitoring",
            prometheus_release=config.get("prometheusRelease") or "kube-prometheus-stack",
            remote_stack=config.get("remoteStack") or None,
            hf_token=config.require_secret("hfToken"),
            postgres_password=config.require_secret("postgresPassword"),
            proxy_api_keys=config.get_secret("proxyApiKeys"),
            proxy_admin_key=config.get_secret("proxyAdminKey"),
        )
