"""ModelServer: one catalog backend as a vLLM Deployment (its replicas), its model cache, and a
headless Service through which the proxy sees each pod."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from dreamseed.policy import Backend
from infra.components.vllm import HF_CACHE, vllm_command

from .common import MODEL_PORT, labels, metadata, model_server_name

# vLLM downloads and loads the weights before /health answers: a startup probe that gives it 20
# minutes (120 x 10 s), after which liveness takes over (kubernetes.io/docs/concepts/configuration/
# liveness-readiness-startup-probes).
STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 120


@dataclass
class ModelServerArgs:
    name: str
    backend: Backend
    namespace: pulumi.Input[str]
    hf_token_secret: pulumi.Input[str]  # a Secret with key HF_TOKEN
    storage_class: str | None
    cache_gib: int
    runtime_class: str | None  # the GPU Operator's `nvidia`, where the cluster needs it named


class ModelServer(pulumi.ComponentResource):
    """An on-demand backend's Deployment stands at 0 replicas: the proxy's scaler scales it (the
    kubernetes actuator). A backend with several `replicas` in the catalog gets that many pods."""

    def __init__(self, resource_name: str, args: ModelServerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:ModelServer", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        backend, name = args.backend, model_server_name(args.name)
        selector = labels(name, "model-server")
        self.cache = k8s.core.v1.PersistentVolumeClaim(
            f"{resource_name}-cache",
            metadata=metadata(f"{name}-hf-cache", args.namespace, "model-cache"),
            spec={"accessModes": ["ReadWriteOnce"], "storageClassName": args.storage_class,
                  "resources": {"requests": {"storage": f"{args.cache_gib}Gi"}}},
            opts=child)
        probe = {"httpGet": {"path": "/health", "port": MODEL_PORT}}
        replicas = 0 if backend.on_demand else len(backend.replica_list())
        self.deployment = k8s.apps.v1.Deployment(
            resource_name,
            metadata=metadata(name, args.namespace, "model-server"),
            spec={
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                # One cache volume (ReadWriteOnce): the old pod lets go of the GPU and the volume first.
                "strategy": {"type": "Recreate"},
                "template": {
                    "metadata": {"labels": selector},
                    "spec": {
                        **({"runtimeClassName": args.runtime_class} if args.runtime_class else {}),
                        "containers": [{
                            "name": "vllm",
                            "image": backend.image,
                            "args": vllm_command(backend, MODEL_PORT),
                            "ports": [{"name": "http", "containerPort": MODEL_PORT}],
                            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                                "name": args.hf_token_secret, "key": "HF_TOKEN"}}}],
                            "resources": {"limits": {"nvidia.com/gpu": backend.tensor_parallel_size}},
                            "volumeMounts": [{"name": "hf-cache", "mountPath": HF_CACHE},
                                             {"name": "shm", "mountPath": "/dev/shm"}],
                            "startupProbe": {**probe, "periodSeconds": STARTUP_PERIOD_S,
                                             "failureThreshold": STARTUP_FAILURES},
                            "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
                            "livenessProbe": {**probe, "periodSeconds": 30, "failureThreshold": 3},
                        }],
                        "volumes": [
                            {"name": "hf-cache", "persistentVolumeClaim": {"claimName": self.cache.metadata["name"]}},
                            # vLLM's tensor-parallel workers share memory through /dev/shm (Docker's --ipc=host).
                            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                        ],
                    },
                },
            },
            opts=child)
        # Headless: DNS answers with every ready pod's address, so the proxy can see each replica.
        self.service = k8s.core.v1.Service(
            f"{resource_name}-service",
            metadata=metadata(name, args.namespace, "model-server"),
            spec={"clusterIP": "None", "selector": selector,
                  "ports": [{"name": "http", "port": MODEL_PORT, "targetPort": MODEL_PORT}]},
            opts=child)
        self.url = f"http://{name}:{MODEL_PORT}"
        self.register_outputs({"url": self.url})
