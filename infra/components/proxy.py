"""ProxyService: the DreamSeed proxy container, the only service published beyond localhost.

Its OpenAI port is published; /metrics and the probes are served without a key on a second port
(`serve --metrics-port`) that only the Docker network reaches: Prometheus scrapes it there, and the
public port answers /metrics only with the admin key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_docker as docker

from dreamseed import __version__

from .common import python_healthcheck, secret_env

CONTAINER_PORT = 8080
METRICS_PORT = 9464  # the internal listener: never published
POLICY_DIR = "/app/policies"
NAME = "dreamseed-proxy"


@dataclass
class ProxyServiceArgs:
    network: pulumi.Input[str]
    build_context: Path
    policy_files: dict[str, str]  # file name -> content, from policies/
    port: int
    bind_address: str
    env: dict[str, pulumi.Input[str]] = field(default_factory=dict)
    secret_env: dict[str, pulumi.Input[str]] = field(default_factory=dict)


class ProxyService(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: ProxyServiceArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:ProxyService", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.image = docker.Image(
            f"{resource_name}-image",
            image_name=f"dreamseed-proxy:{__version__}",
            build=docker.DockerBuildArgs(
                context=str(args.build_context), dockerfile=str(args.build_context / "infra" / "proxy.Dockerfile")
            ),
            skip_push=True,
            opts=child,
        )
        envs: list[pulumi.Input[str]] = [f"{k}={v}" if isinstance(v, str) else pulumi.Output.concat(k, "=", v)
                                         for k, v in sorted(args.env.items())]
        envs += [secret_env(k, v) for k, v in sorted(args.secret_env.items())]
        self.container = docker.Container(
            resource_name,
            name=NAME,
            # By digest: a rebuilt image (same tag, new content) replaces the container.
            image=self.image.repo_digest,
            command=["serve", "--host", "0.0.0.0", "--port", str(CONTAINER_PORT), "--policies", POLICY_DIR,
                     "--metrics-host", "0.0.0.0", "--metrics-port", str(METRICS_PORT)],
            envs=envs,
            # Policies travel with the deployment: a changed file replaces the container.
            uploads=[docker.ContainerUploadArgs(file=f"{POLICY_DIR}/{name}", content=content)
                     for name, content in sorted(args.policy_files.items())],
            ports=[docker.ContainerPortArgs(internal=CONTAINER_PORT, external=args.port, ip=args.bind_address)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["proxy"])],
            healthcheck=python_healthcheck(f"http://127.0.0.1:{METRICS_PORT}/healthz"),
            restart="unless-stopped",
            opts=child,
        )
        self.target = f"{NAME}:{METRICS_PORT}"  # what Prometheus scrapes
        self.register_outputs({"image": self.image.repo_digest})
