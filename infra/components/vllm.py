"""VllmBackend: one vLLM OpenAI-compatible server for one catalog backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_docker as docker

from dreamseed.policy import Backend

from .common import backend_port, container_name, pulled, python_healthcheck, secret_env

HF_CACHE = "/root/.cache/huggingface"
# How long `pulumi up` waits for a server to become healthy before starting the next one: a first
# start downloads the weights (the healthcheck's start period is 900 s).
HEALTHY_WAIT_S = 1800


def vllm_command(backend: Backend, port: int) -> list[str]:
    """vLLM's arguments, all from the catalog: the one place models and limits are set. A
    pre-quantized `checkpoint` is served under the catalog's `model` id, the name clients and routing use."""
    command = ["--model", backend.checkpoint or backend.model]
    if backend.checkpoint:
        command += ["--served-model-name", backend.model]
    command += ["--port", str(port), "--max-model-len", str(backend.context_length)]
    if backend.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", f"{backend.gpu_memory_utilization:g}"]
    if backend.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(backend.tensor_parallel_size)]
    # vLLM's own queue should not accept more than the proxy sends it.
    command += ["--max-num-seqs", str(max(backend.max_concurrency, 1))]
    return command + list(backend.args)


# The container's entrypoint: wait until every server in $DREAMSEED_START_AFTER answers /health, then
# run vLLM with the container's command as its arguments. Servers sharing a GPU must not initialise
# at once (each measures free memory while it starts and counts the other's allocations as its own);
# `pulumi up` already creates them one after another, but after a reboot Docker's restart policy
# starts them all together, and this makes them queue. The image's Python does the probing (vLLM's
# image has no curl).
START_SCRIPT = """\
for url in $DREAMSEED_START_AFTER; do
  echo "waiting for $url before initialising on the shared GPU" >&2
  until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$url" 2>/dev/null; do
    sleep "${DREAMSEED_START_POLL:-5}"
  done
done
exec vllm serve "$@"
"""
START_ENTRYPOINT = ["/bin/sh", "-c", START_SCRIPT, "vllm-after"]


def server_url(name: str, backend: Backend, replica: int | None = None, port: int | None = None) -> str:
    """Where a backend's server answers on the stack's Docker network (the proxy's URL for it)."""
    return f"http://{container_name(name, replica)}:{port or backend_port(backend)}"


def health_url(name: str, backend: Backend) -> str:
    return f"{server_url(name, backend)}/health"


@dataclass
class VllmBackendArgs:
    name: str
    backend: Backend
    network: pulumi.Input[str]
    hf_cache_volume: pulumi.Input[str]
    hf_token: pulumi.Input[str]
    # vLLM servers sharing a GPU must not initialise at once: each measures free memory while it
    # starts and counts the other's allocations as its own. An always-on server is created only once
    # this one (the previous always-on server) is healthy.
    start_after: docker.Container | None = None
    # Health URLs this server waits for at every start (after a reboot too): the always-on servers
    # before it on the GPU, or all of them for an on-demand one.
    wait_for: list[str] = field(default_factory=list)
    # One replica of a backend of several: its number (the proxy's name#N), the port of its catalog
    # URL, and the address its port is published on (its host's own, for a proxy on another host).
    replica: int | None = None
    port: int | None = None
    publish_ip: str = "127.0.0.1"


class VllmBackend(pulumi.ComponentResource):
    """A GPU container running vLLM. An on-demand backend is created but left stopped
    (`start=False`, `must_run=False`, restart policy `no`): the proxy's scaler starts and stops
    the container named `container_name` through the Docker API, and Pulumi does not treat
    its stopped state as drift."""

    container_name: pulumi.Output[str]
    internal_url: str
    port: int

    def __init__(self, resource_name: str, args: VllmBackendArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:VllmBackend", resource_name, None, opts)
        backend = args.backend
        if backend.image is None:
            raise pulumi.RunError(f"backend {args.name!r} has no `image` in the catalog; infra needs a pinned vLLM image")
        port = self.port = args.port or backend_port(backend)
        name = container_name(args.name, args.replica)
        image = pulled(f"{resource_name}-image", backend.image, self)
        always_on = not backend.on_demand
        self.container = docker.Container(
            resource_name,
            name=name,
            image=image.image_id,
            entrypoints=START_ENTRYPOINT,
            command=vllm_command(backend, port),
            envs=[secret_env("HF_TOKEN", args.hf_token), f"DREAMSEED_START_AFTER={' '.join(args.wait_for)}"],
            # All GPUs of the host; each server takes its catalog share of memory.
            device_requests=[docker.ContainerDeviceRequestArgs(driver="nvidia", count=-1, capabilities=["gpu"])],
            ipc_mode="host",  # vLLM's workers share memory through /dev/shm
            volumes=[docker.ContainerVolumeArgs(volume_name=args.hf_cache_volume, container_path=HF_CACHE)],
            ports=[docker.ContainerPortArgs(internal=port, external=port, ip=args.publish_ip)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(
                name=args.network, aliases=[args.name if args.replica is None else name])],
            healthcheck=python_healthcheck(f"http://127.0.0.1:{port}/health", start_period="900s"),
            restart="unless-stopped" if always_on else "no",
            start=always_on,
            must_run=always_on,
            # `pulumi up` waits until the server is healthy, so the next one starts on a settled GPU.
            wait=always_on,
            wait_timeout=HEALTHY_WAIT_S if always_on else None,
            labels=[docker.ContainerLabelArgs(label="dreamseed.backend", value=args.name),
                    *([docker.ContainerLabelArgs(label="dreamseed.replica", value=str(args.replica))]
                      if args.replica is not None else []),
                    docker.ContainerLabelArgs(label="dreamseed.on_demand", value=str(backend.on_demand).lower())],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[args.start_after] if args.start_after else None),
        )
        self.container_name = self.container.name
        self.internal_url = server_url(args.name, backend, args.replica, port)
        self.health_url = f"{self.internal_url}/health"
        self.register_outputs({"container_name": self.container.name, "internal_url": self.internal_url})
