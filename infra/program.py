"""The two stacks. Each only composes components; what to build comes from the catalog.

- `local`: the RTX 5090 host's Docker. One vLLM container per catalog backend on that host
  (on-demand ones created stopped), the embedding server, Postgres+pgvector, Prometheus and
  Grafana, and the proxy, which alone is published beyond localhost.
- `remote70b`: a Lambda Cloud 2xA100 instance running the catalog backend(s) placed on that
  host. The `local` stack reads its outputs through a StackReference and tunnels to it.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pulumi
import pulumi_docker as docker

from dreamseed.policy import DockerActuator, MemoryPlan, Policies, memory_plan

from .components.common import backends_on, container_name, replicas_on
from .components.docker_gate import DockerGate, DockerGateArgs, socket_group
from .components.embeddings import EmbeddingServer, EmbeddingServerArgs
from .components.monitoring import Monitoring, MonitoringArgs
from .components.proxy import NAME as PROXY_NAME
from .components.proxy import ProxyService, ProxyServiceArgs
from .components.remote_gpu import RemoteGpuHost, RemoteGpuHostArgs
from .components.tunnel import SshTunnel, SshTunnelArgs
from .components.vector_db import VectorDatabase, VectorDatabaseArgs
from .components.vllm import VllmBackend, VllmBackendArgs, health_url
from .config import ROOT, LocalConfig, RemoteConfig
from .monitoring import alert_rules


def checked_memory_plan(policies: Policies, host: str) -> MemoryPlan:
    """The host's GPU memory plan. The numbers are the catalog's (policies/backends.yaml `hosts`
    and each backend's `gpu_memory_utilization` and `memory`), the same ones the proxy's scaler
    budgets with; loading the policies already refused a plan that does not fit, naming the backend
    and the numbers. A server this stack deploys must say what it needs (`memory`), or the plan
    could not tell whether it fits."""
    if host not in policies.catalog.hosts:
        raise pulumi.RunError(f"gpuHost {host!r} is not a host in backends.yaml (known: {', '.join(policies.catalog.hosts)})")
    plan = memory_plan(policies.catalog, host)
    undeclared = [name for name, b in plan.backends.items() if not b.declared]
    if undeclared:
        raise pulumi.RunError(
            f"backends.yaml: {', '.join(undeclared)} on host {host!r} give no `memory` (weights_gib, weights_dtype, "
            "kv_cache_kib_per_token): the GPU memory plan cannot check that they fit; `dreamseed policies plan` shows it")
    return plan


def plan_summary(plan: MemoryPlan) -> dict[str, Any]:
    """The plan in the stack's outputs, per GPU, in GiB (`dreamseed policies plan` prints it as a table)."""
    return {
        "host": plan.host_name,
        # Per GPU: with tensor parallelism every GPU holds the same share.
        "gpuCount": plan.host.gpu_count,
        "gpuMemoryGib": plan.gpu_gib,
        "budgetGib": round(plan.budget_gib, 2),
        "backends": {
            name: {"onDemand": b.on_demand, "shareGib": round(b.share_gib, 2), "weightsGib": round(b.weights_gib, 2),
                   "kvCacheGib": round(b.kv_gib_available, 2), "kvTokens": b.kv_tokens_available,
                   "kvTokensNeeded": b.kv_tokens_needed, "headroomGib": round(b.headroom_gib, 2)}
            for name, b in plan.backends.items()
        },
        "alwaysOnGib": round(plan.always_on_gib, 2),
        "worstCaseGib": round(plan.worst_case_gib, 2),
    }


# Lambda Cloud instance types: GPUs and GiB per GPU (GET /instance-types lists them; the create script
# checks name, region and capacity against the live API before launching). Used at preview to refuse
# a type smaller than the host the catalog plans for.
LAMBDA_GPUS = {
    "gpu_1x_a10": (1, 24), "gpu_1x_a6000": (1, 48), "gpu_2x_a6000": (2, 48), "gpu_4x_a6000": (4, 48),
    "gpu_1x_a100": (1, 40), "gpu_1x_a100_sxm4": (1, 40), "gpu_2x_a100": (2, 40), "gpu_4x_a100": (4, 40),
    "gpu_8x_a100": (8, 40), "gpu_8x_a100_80gb_sxm4": (8, 80), "gpu_1x_h100_pcie": (1, 80),
    "gpu_1x_h100_sxm5": (1, 80), "gpu_2x_h100_sxm5": (2, 80), "gpu_4x_h100_sxm5": (4, 80),
    "gpu_8x_h100_sxm5": (8, 80), "gpu_1x_gh200": (1, 96),
}


def check_instance_type(instance_type: str, host: str, plan: MemoryPlan) -> None:
    """Refuse at preview an instance type whose GPUs are fewer or smaller than the catalog's host."""
    known = LAMBDA_GPUS.get(instance_type)
    if known is None:
        return  # not in our table: the create script checks it against Lambda's live catalog
    count, gib = known
    if count < plan.host.gpu_count or gib < plan.host.gpu_memory_gb:
        fitting = sorted(t for t, (c, g) in LAMBDA_GPUS.items() if c >= plan.host.gpu_count and g >= plan.host.gpu_memory_gb)
        raise pulumi.RunError(
            f"dreamseed:instanceType {instance_type} has {count} x {gib} GiB GPUs, but backends.yaml plans host {host!r} "
            f"as {plan.host.gpu_count} x {plan.host.gpu_memory_gb:g} GiB. Types that hold the plan: {', '.join(fitting)}; "
            "or change the host in backends.yaml (`dreamseed policies plan` shows what then fits)")


def place_replicas(config: LocalConfig, network: docker.Network, hf_cache: docker.Volume, provider: docker.Provider,
                   backend_urls: dict[str, pulumi.Input[str]]) -> dict[str, tuple[str, bool]]:
    """The vLLM containers of backends with several replicas, each on the host its catalog entry
    names: on this stack's host beside the other servers (the proxy reaches it by container name,
    under the replica's `url_env`), on another host through that host's own Docker engine (the
    host's `docker` in backends.yaml), published on its `url`'s address, where the proxy reaches it.
    Each host's memory plan is checked. Returns Prometheus's targets, by the proxy's replica label."""
    policies = config.policies
    hosts = [h for h in policies.catalog.hosts if replicas_on(policies, h)]
    targets: dict[str, tuple[str, bool]] = {}
    for host in hosts:
        checked_memory_plan(policies, host)
        here = host == config.gpu_host
        on_host = pulumi.ResourceOptions(provider=provider)
        host_network: pulumi.Input[str] = network.name
        host_cache: pulumi.Input[str] = hf_cache.name
        if not here:
            engine = policies.catalog.hosts[host].docker
            if engine is None:
                labels = ", ".join(f"{n}#{i}" for n, _, i, _ in replicas_on(policies, host))
                raise pulumi.RunError(f"backends.yaml: hosts.{host} runs replicas ({labels}) but has no `docker`: say how "
                                      f"to reach its Docker engine, e.g. docker: ssh://user@{host}")
            on_host = pulumi.ResourceOptions(provider=docker.Provider(f"docker-{host}", host=engine))
            host_network = docker.Network(f"network-{host}", name="dreamseed", opts=on_host).name
            host_cache = docker.Volume(f"hf-cache-{host}", name="dreamseed-hf-cache", opts=pulumi.ResourceOptions.merge(
                on_host, pulumi.ResourceOptions(protect=config.protect_data))).name
        previous: docker.Container | None = None
        for name, backend, number, replica in replicas_on(policies, host):
            label = f"{name}#{number}"
            if here and replica.url_env is None:
                raise pulumi.RunError(f"backends.yaml: replica {label} on {host} needs `url_env`: the containerised proxy "
                                      "reaches it by container name")
            address = urlsplit(replica.url or "").hostname
            if not here and (address is None or not _is_ip(address)):
                raise pulumi.RunError(f"backends.yaml: replica {label} on {host} needs a `url` with the host's IP address "
                                      f"(got {replica.url!r}): its container is published there for the proxy")
            server = VllmBackend(f"vllm-{name}-{number}", VllmBackendArgs(
                name=name, backend=backend, network=host_network, hf_cache_volume=host_cache, hf_token=config.hf_token,
                start_after=previous, replica=number, port=urlsplit(replica.url).port if replica.url else None,
                publish_ip="127.0.0.1" if here else str(address)), opts=on_host)
            if not backend.on_demand:
                previous = server.container
            if here:
                assert replica.url_env is not None
                backend_urls[replica.url_env] = server.internal_url
                targets[label] = (server.internal_url.removeprefix("http://"), backend.on_demand)
            else:
                targets[label] = (f"{address}:{server.port}", backend.on_demand)
    return targets


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build_local(config: LocalConfig) -> dict[str, Any]:
    policies = config.policies
    plan = checked_memory_plan(policies, config.gpu_host)
    provider = docker.Provider("docker", host=config.docker_host)
    on_host = pulumi.ResourceOptions(provider=provider)

    network = docker.Network("network", name="dreamseed", opts=on_host)
    # The model weights (tens of GB downloaded from the hub): protected like the other data volumes.
    hf_cache = docker.Volume("hf-cache", name="dreamseed-hf-cache",
                             opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(protect=config.protect_data)))

    backend_urls: dict[str, pulumi.Input[str]] = {}
    vllm: dict[str, VllmBackend] = {}
    previous: docker.Container | None = None  # the always-on server started before this one
    started_before: list[str] = []  # health URLs of the always-on servers before this one
    always_on_health = [health_url(n, b) for n, b in backends_on(policies, config.gpu_host).items() if not b.on_demand]
    for name, backend in backends_on(policies, config.gpu_host).items():
        if backend.url_env is None:
            raise pulumi.RunError(
                f"backend {name!r} needs `url_env` in backends.yaml: the containerised proxy reaches it by container name"
            )
        vllm[name] = VllmBackend(
            f"vllm-{name}",
            VllmBackendArgs(name=name, backend=backend, network=network.name, hf_cache_volume=hf_cache.name,
                            hf_token=config.hf_token, start_after=previous,
                            wait_for=list(started_before) if not backend.on_demand else always_on_health),
            opts=on_host,
        )
        if not backend.on_demand:
            previous = vllm[name].container
            started_before.append(vllm[name].health_url)
        backend_urls[backend.url_env] = vllm[name].internal_url

    replica_targets = place_replicas(config, network, hf_cache, provider, backend_urls)

    # scale.yaml's docker actuators must name the containers declared here, or the proxy's scaler
    # would start nothing (caught at preview, not at the first coding request).
    for name, on_demand in policies.scale.backends.items():
        actuator = on_demand.actuator
        if isinstance(actuator, DockerActuator) and name in vllm and actuator.container != container_name(name):
            raise pulumi.RunError(
                f"policies/scale.yaml: backends.{name}.actuator.container is {actuator.container!r}, but the container "
                f"this stack declares for {name!r} is 'dreamseed-{name}'"
            )

    secret_env: dict[str, pulumi.Input[str]] = {}
    tunnel = None
    remote_names: list[str] = []
    if config.remote_stack:
        remote = pulumi.StackReference(config.remote_stack)
        for name, backend in policies.catalog.backends.items():
            if backend.host is None or backend.host == config.gpu_host:
                continue
            tunnel = SshTunnel(
                f"tunnel-{name}",
                SshTunnelArgs(network=network.name, alias=name, ssh_host=remote.require_output("publicIp"),
                              ssh_user=remote.require_output("sshUser"),
                              tunnel_private_key=remote.require_output("tunnelPrivateKey"),
                              ssh_host_key=remote.require_output("sshHostKey"),
                              remote_port=remote.require_output("port")),
                opts=on_host,
            )
            remote_names.append(name)
            if backend.url_env:
                backend_urls[backend.url_env] = tunnel.internal_url
            if backend.api_key_env:
                secret_env[backend.api_key_env] = remote.require_output("apiKey")

    database = VectorDatabase("postgres", VectorDatabaseArgs(network=network.name, password=config.postgres_password,
                                                             protect_data=config.protect_data), opts=on_host)
    secret_env["DATABASE_URL"] = database.url
    if config.proxy_api_keys is None and config.proxy_bind_address not in ("127.0.0.1", "localhost", "::1"):
        # The proxy refuses to serve beyond loopback without client keys and would exit at once: say
        # so at preview, not as a crash-looping container after `pulumi up`.
        raise pulumi.RunError(
            f"the proxy is published on {config.proxy_bind_address}:{config.proxy_port} but has no client API keys: "
            "set them with `pulumi config set --secret dreamseed:proxyApiKeys 'key1,key2'` "
            "(or publish on loopback only: `pulumi config set dreamseed:proxyBindAddress 127.0.0.1`)")
    if config.proxy_api_keys is not None:
        secret_env["DREAMSEED_API_KEYS"] = config.proxy_api_keys
    if config.proxy_admin_key is not None:
        secret_env["DREAMSEED_ADMIN_KEY"] = config.proxy_admin_key

    plain_env: dict[str, pulumi.Input[str]] = dict(backend_urls)
    # The scaler reaches Docker only through the gate, and only for the declared on-demand containers.
    on_demand_containers = [container_name(n) for n, b in backends_on(policies, config.gpu_host).items() if b.on_demand]
    if on_demand_containers:
        gate = DockerGate("docker-gate", DockerGateArgs(
            network=network.name, containers=on_demand_containers, allow_from=PROXY_NAME,
            socket_gid=socket_group(config.docker_host, config.docker_socket_gid)), opts=on_host)
        plain_env["DOCKER_HOST"] = gate.docker_host
    # rag.yaml is the one place the embedding model is named. An embedding server is declared only
    # when rag.yaml embeds through one whose URL the deployment supplies (`kind: openai` with
    # `url_env`): it serves rag.yaml's model, and its URL reaches the proxy under that variable. The
    # seed embeds in-process (fastembed), and a fixed `url` names the operator's own server: no
    # container for either. (The policy check already requires `url` or `url_env`, and `dim`.)
    embedder = policies.rag.embedder
    embeddings_target: str | None = None
    if embedder.kind == "openai" and embedder.url_env is not None:
        embeddings = EmbeddingServer(
            "embeddings",
            EmbeddingServerArgs(network=network.name, model=embedder.model, hf_cache_volume=hf_cache.name,
                                hf_token=config.hf_token),
            opts=on_host,
        )
        plain_env[embedder.url_env] = embeddings.internal_url
        embeddings_target = embeddings.metrics_target

    policy_files = {p.name: p.read_text(encoding="utf-8") for p in sorted(policies.directory.glob("*.yaml"))}
    proxy = ProxyService(
        "proxy",
        ProxyServiceArgs(
            network=network.name, build_context=ROOT, policy_files=policy_files, port=config.proxy_port,
            bind_address=config.proxy_bind_address, env=plain_env, secret_env=secret_env,
        ),
        opts=on_host,
    )

    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(
            network=network.name,
            proxy_target=proxy.target,
            vllm_targets={**{name: (component.internal_url.removeprefix("http://"),
                                    policies.catalog.backends[name].on_demand)
                             for name, component in vllm.items()}, **replica_targets},
            rules=alert_rules(policies, config.gpu_host),
            grafana_port=config.grafana_port,
            grafana_admin_password=config.grafana_admin_password,
            protect_data=config.protect_data,
            remote_vllm_targets={name: f"dreamseed-tunnel-{name}:8000" for name in remote_names},
            embeddings_target=embeddings_target,
            alert_webhook_url=config.alert_webhook_url,
        ),
        opts=on_host,
    )
    return {
        "proxyUrl": f"http://{config.proxy_bind_address}:{config.proxy_port}",
        "grafanaUrl": f"http://127.0.0.1:{config.grafana_port}",
        "gpuMemoryPlan": plan_summary(plan),
        "onDemandContainers": [container_name(n) for n, b in backends_on(policies, config.gpu_host).items() if b.on_demand],
        "databaseUrl": database.url,
        # What `pulumi destroy` leaves in place, and how to remove it on purpose.
        "protectedVolumes": [database.volume.name, hf_cache.name, monitoring.prometheus_volume.name]
        if config.protect_data else [],
        "removeProtectedVolumes": "pulumi config set dreamseed:protectData false && pulumi up, then pulumi destroy"
        if config.protect_data else "",
    }


def load_script(path: Path, name: str) -> Any:
    """A stand-alone script (infra/scripts/: run by commands and on the rented host, outside any
    package) as a module. Registered under `name`, as dataclasses need their module found."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lambda_preflight(config: RemoteConfig) -> None:
    """At preview (which `pulumi up` runs first), ask Lambda's API whether `up` can launch what the
    stack asks for: the instance runs already, or its type exists and has capacity in the region
    now, and the persistent filesystem is there. A refusal names what is free instead. When the
    API cannot be reached from here, say so and leave the check to the create command."""
    script = load_script(ROOT / "infra" / "scripts" / "lambda_instance.py", "lambda_instance")
    wanted = {"name": config.instance_name, "region": config.region, "instance_type": config.instance_type}
    # The plain key, for this one call; it is never exported or logged.
    key = pulumi.Config().get("lambdaApiKey")
    try:
        found = script.preflight(wanted, config.file_system_name, base_url=config.lambda_api_url, key=key, timeout=20)
    except script.UnreachableError as exc:
        pulumi.log.warn(f"Lambda's API did not answer ({exc}); capacity is checked again before launching")
        return
    except script.LambdaError as exc:
        raise pulumi.RunError(f"Lambda Cloud: {exc}") from None
    pulumi.log.info(f"Lambda Cloud: {found}")
    if not found.startswith("instance "):
        # pulumi-command has no Read: an instance the auto-stop ended stays in the state, and `up` changes nothing.
        pulumi.log.info(f"no instance named {config.instance_name} runs: if this stack launched one before, the "
                        "auto-stop has ended it; bring it back with "
                        '`eval "$(pulumi stack output --stack remote70b relaunch)"` (docs/infrastructure.md)')


def build_remote(config: RemoteConfig) -> dict[str, Any]:
    policies = config.policies
    plan = checked_memory_plan(policies, config.gpu_host)
    hosted = backends_on(policies, config.gpu_host)
    if replicas_on(policies, config.gpu_host):
        raise pulumi.RunError(f"the remote70b stack runs one instance; backends.yaml places replicas on {config.gpu_host!r}")
    if len(hosted) != 1:
        raise pulumi.RunError(
            f"the remote70b stack runs exactly one backend on host {config.gpu_host!r}; the catalog places "
            f"{len(hosted)} there ({', '.join(hosted) or 'none'})"
        )
    (name, backend), = hosted.items()
    if backend.image is None:
        raise pulumi.RunError(f"backend {name!r} has no `image` in backends.yaml")
    check_instance_type(config.instance_type, config.gpu_host, plan)
    if pulumi.runtime.is_dry_run():
        lambda_preflight(config)
    host = RemoteGpuHost(
        "gpu-host",
        RemoteGpuHostArgs(
            name=name, backend=backend, lambda_api_url=config.lambda_api_url, lambda_api_key=config.lambda_api_key,
            region=config.region, instance_type=config.instance_type, instance_name=config.instance_name,
            ssh_key_name=config.ssh_key_name, ssh_user=config.ssh_user, ssh_private_key=config.ssh_private_key,
            hf_token=config.hf_token, vllm_api_key=config.vllm_api_key, file_system_name=config.file_system_name,
            idle_minutes=config.idle_minutes, max_lifetime_hours=config.max_lifetime_hours,
        ),
    )
    return {
        "backend": name,
        "instanceId": host.instance_id,
        "publicIp": host.public_ip,
        "sshUser": config.ssh_user,
        "port": host.port,
        # vLLM answers on the host's loopback only; reach it through SSH (the local stack's tunnel).
        "url": f"http://127.0.0.1:{host.port}",
        "apiKey": pulumi.Output.secret(config.vllm_api_key),
        # For the local stack's tunnel: a key that can only forward to vLLM's port, and the host key
        # to pin (read over the SSH connection that created the instance).
        "tunnelPrivateKey": pulumi.Output.secret(host.tunnel_private_key),
        "sshHostKey": host.ssh_host_key,
        "gpuMemoryPlan": plan_summary(plan),
        # The instance terminates itself when idle or too old (Lambda bills until then). Pulumi's
        # state still names it and pulumi-command cannot notice (it has no Read), so bring it back
        # with this: a new instance, its bootstrap and keys, then the local stack's tunnel to them.
        "autoStop": {"idleMinutes": config.idle_minutes, "maxLifetimeHours": config.max_lifetime_hours},
        "relaunch": pulumi.Output.concat(f"pulumi up --stack {pulumi.get_stack()} --replace '", host.instance.urn,
                                         "' && pulumi up --stack local"),
    }


def main() -> None:
    stack = pulumi.get_stack()
    if stack == "local":
        outputs = build_local(LocalConfig.load())
    elif stack == "remote70b":
        outputs = build_remote(RemoteConfig.load())
    elif stack == "k8s":
        from .config import K8sConfig
        from .k8s.program import build_k8s

        outputs = build_k8s(K8sConfig.load())
    else:
        raise pulumi.RunError(f"unknown stack {stack!r}: DreamSeed's stacks are 'local', 'remote70b' and 'k8s'")
    for key, value in outputs.items():
        pulumi.export(key, value)
