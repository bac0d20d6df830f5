"""EmbeddingServer: rag.yaml's embedding model served on the cluster (text-embeddings-inference on
the CPU, as the local stack runs it), when rag.yaml embeds through a server whose URL the deployment
supplies (`kind: openai` with `url_env`). The seed embeds in the proxy's process: nothing to run."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from infra import images
from infra.components.embeddings import METRICS_PORT, PORT

from .common import labels, metadata

NAME = "dreamseed-embeddings"


@dataclass
class EmbeddingServerArgs:
    namespace: pulumi.Input[str]
    model: str
    hf_token_secret: pulumi.Input[str]  # a Secret with key HF_TOKEN


class EmbeddingServer(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: EmbeddingServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:EmbeddingServer", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        selector = labels(NAME, "embeddings")
        probe = {"httpGet": {"path": "/health", "port": PORT}}
        self.deployment = k8s.apps.v1.Deployment(
            resource_name,
            metadata=metadata(NAME, args.namespace, "embeddings"),
            spec={"replicas": 1, "selector": {"matchLabels": selector}, "template": {
                "metadata": {"labels": selector},
                "spec": {"containers": [{
                    "name": "embeddings",
                    "image": images.EMBEDDINGS,
                    "args": ["--model-id", args.model, "--port", str(PORT), "--prometheus-port", str(METRICS_PORT)],
                    "ports": [{"name": "http", "containerPort": PORT}, {"name": "metrics", "containerPort": METRICS_PORT}],
                    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": args.hf_token_secret,
                                                                                "key": "HF_TOKEN"}}},
                            {"name": "HUGGINGFACE_HUB_CACHE", "value": "/data"}],
                    "volumeMounts": [{"name": "cache", "mountPath": "/data"}],
                    # The model downloads before /health answers: five minutes for a small one.
                    "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 30},
                    "readinessProbe": {**probe, "periodSeconds": 10},
                }], "volumes": [{"name": "cache", "emptyDir": {}}]},
            }},
            opts=child)
        self.service = k8s.core.v1.Service(
            f"{resource_name}-service",
            metadata=metadata(NAME, args.namespace, "embeddings"),
            spec={"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": PORT},
                                                  {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]},
            opts=child)
        self.url = f"http://{NAME}:{PORT}"
        self.register_outputs({"url": self.url})
