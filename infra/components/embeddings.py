"""EmbeddingServer: the seed's embedding service on :8003, OpenAI-compatible (/v1/embeddings).

Hugging Face text-embeddings-inference on the CPU: all-MiniLM-L6-v2 is small enough that the
GPU memory stays with the LLMs (the catalog's memory plan does not have to include it).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images

from .common import pulled, secret_env

PORT = 8003
METRICS_PORT = 9000  # text-embeddings-inference's Prometheus port (--prometheus-port, its default)


@dataclass
class EmbeddingServerArgs:
    network: pulumi.Input[str]
    model: str
    hf_cache_volume: pulumi.Input[str]
    hf_token: pulumi.Input[str]


class EmbeddingServer(pulumi.ComponentResource):
    internal_url: str
    metrics_target: str

    def __init__(self, resource_name: str, args: EmbeddingServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:EmbeddingServer", resource_name, None, opts)
        name = "dreamseed-embeddings"
        image = pulled(f"{resource_name}-image", images.EMBEDDINGS, self)
        self.container = docker.Container(
            resource_name,
            name=name,
            image=image.image_id,
            command=["--model-id", args.model, "--port", str(PORT), "--prometheus-port", str(METRICS_PORT)],
            envs=[secret_env("HF_TOKEN", args.hf_token), "HUGGINGFACE_HUB_CACHE=/data"],
            volumes=[docker.ContainerVolumeArgs(volume_name=args.hf_cache_volume, container_path="/data")],
            ports=[docker.ContainerPortArgs(internal=PORT, external=PORT, ip="127.0.0.1")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["embeddings"])],
            restart="unless-stopped",
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.internal_url = f"http://{name}:{PORT}"
        self.metrics_target = f"{name}:{METRICS_PORT}"
        self.register_outputs({"internal_url": self.internal_url})
