"""Names and labels the k8s components share."""

from __future__ import annotations

from typing import Any

from infra.components.common import backend_port, container_name

PART_OF = "dreamseed"
MODEL_PORT = 8000  # every vLLM server listens here inside its pod
PROXY_PORT = 8080
METRICS_PORT = 9464


def labels(name: str, component: str) -> dict[str, str]:
    """The recommended labels (kubernetes.io/docs/concepts/overview/working-with-objects/common-labels)."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF}


def model_server_name(backend: str) -> str:
    """A backend's Deployment and Service: the same name as its container on the local stack."""
    return container_name(backend)


def metadata(name: str, namespace: Any, component: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(name, component), **extra}


__all__ = ["METRICS_PORT", "MODEL_PORT", "PROXY_PORT", "backend_port", "labels", "metadata", "model_server_name"]
