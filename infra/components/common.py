"""Small helpers the components share."""

from __future__ import annotations

from urllib.parse import urlsplit

import pulumi
import pulumi_docker as docker

from dreamseed.policy import Backend, Policies


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


def container_name(backend_name: str) -> str:
    """The Docker container (and network alias) of a backend's server: what scale.yaml's docker
    actuator names and Prometheus scrapes."""
    return f"dreamseed-{backend_name}"


def backends_on(policies: Policies, host: str) -> dict[str, Backend]:
    """The catalog's backends placed on one GPU host. A backend of several replicas is declared by
    no stack yet: refused at preview with what to do, rather than left out without a word."""
    for name, backend in policies.catalog.backends.items():
        if backend.replicas is not None and host in backend.hosts():
            raise pulumi.RunError(
                f"backends.yaml: backend {name!r} has replicas (on {', '.join(backend.hosts())}); this stack declares "
                "one server per backend. Run each replica's vLLM container yourself and give its `url`, or keep one "
                "server per backend here (docs/infrastructure.md, \"Replicas\")")
    return {name: b for name, b in policies.catalog.backends.items() if b.host == host}


def backend_port(backend: Backend, default: int = 8000) -> int:
    """The port a backend's server listens on: its catalog URL's, else vLLM's default."""
    return (urlsplit(backend.url).port if backend.url else None) or default


def pulled(name: str, image: str, parent: pulumi.Resource) -> docker.RemoteImage:
    return docker.RemoteImage(name, name=image, keep_locally=True, opts=pulumi.ResourceOptions(parent=parent))
