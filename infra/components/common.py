"""Small helpers the components share."""

from __future__ import annotations

from urllib.parse import urlsplit

import pulumi
import pulumi_docker as docker

from dreamseed.policy import Backend, Policies, Replica


def python_healthcheck(url: str, start_period: str = "30s") -> docker.ContainerHealthcheckArgs:
    """A Docker healthcheck that GETs a URL with the image's own Python (vLLM and the proxy
    images have Python; not all have curl)."""
    probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"
    return docker.ContainerHealthcheckArgs(
        tests=["CMD", "python3", "-c", probe], interval="30s", timeout="10s", retries=3, start_period=start_period
    )


def secret_env(name: str, value: pulumi.Input[str]) -> pulumi.Output[str]:
    """NAME=value for a container's env, kept secret."""
    return pulumi.Output.secret(pulumi.Output.concat(name, "=", value))


def container_name(backend_name: str, replica: int | None = None) -> str:
    """The Docker container (and network alias) of a backend's server: what scale.yaml's docker
    actuator names and Prometheus scrapes; a backend of several replicas has one per replica,
    numbered as the proxy labels them (general#2 runs in dreamseed-general-2)."""
    return f"dreamseed-{backend_name}" if replica is None else f"dreamseed-{backend_name}-{replica}"


def backends_on(policies: Policies, host: str) -> dict[str, Backend]:
    """The catalog's backends of one server placed on one GPU host (replicas: `replicas_on`)."""
    return {name: b for name, b in policies.catalog.backends.items() if b.host == host and b.replicas is None}


def replicas_on(policies: Policies, host: str) -> list[tuple[str, Backend, int, Replica]]:
    """(backend name, backend, replica number from 1, replica) for each replica placed on a host."""
    return [(name, backend, number, replica) for name, backend in policies.catalog.backends.items()
            if backend.replicas is not None
            for number, replica in enumerate(backend.replicas, start=1) if replica.host == host]


def backend_port(backend: Backend, default: int = 8000) -> int:
    """The port a backend's server listens on: its catalog URL's, else vLLM's default."""
    return (urlsplit(backend.url).port if backend.url else None) or default


def pulled(name: str, image: str, parent: pulumi.Resource) -> docker.RemoteImage:
    return docker.RemoteImage(name, name=image, keep_locally=True, opts=pulumi.ResourceOptions(parent=parent))
