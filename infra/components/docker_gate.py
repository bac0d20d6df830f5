"""DockerGate: the only way the proxy reaches the Docker Engine API.

The proxy faces the internet; a process that holds the raw Docker socket is root on the host. The
scaler needs three calls on the on-demand containers this stack declared (start, stop, inspect), so
a socket proxy (wollomatic/socket-proxy: per-method allowlists of anchored regular expressions on
the request path) holds the socket, read-only, and lets exactly those through, only from the proxy
container. Anything else (listing containers, creating one, exec, another container's start) gets
403 without reaching Docker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images

from .common import pulled

NAME = "dreamseed-docker-gate"
PORT = 2375
DOCKER_SOCKET = "/var/run/docker.sock"
API_VERSION = r"/v1\.[0-9]{2}"  # the actuator's /v1.43/...; any 1.xx Docker accepts


def allowlist(containers: list[str]) -> dict[str, str]:
    """Method -> path pattern (socket-proxy anchors it with ^ and $) for the scaler's calls on
    `containers` and nothing else. Container names are escaped: a dot is a dot."""
    names = "|".join(re.escape(c) for c in sorted(containers))
    return {
        "GET": f"{API_VERSION}/containers/({names})/json",
        "POST": f"{API_VERSION}/containers/({names})/(start|stop)",
    }


def gate_command(containers: list[str], allow_from: str) -> list[str]:
    rules = allowlist(containers)
    return [
        "-listenip=0.0.0.0", f"-proxyport={PORT}", f"-allowfrom={allow_from}",
        f"-allowGET={rules['GET']}", f"-allowPOST={rules['POST']}",
        # A Docker restart breaks the socket: stop, and let the restart policy bring it back.
        "-watchdoginterval=60", "-stoponwatchdog", "-shutdowngracetime=5",
    ]


@dataclass
class DockerGateArgs:
    network: pulumi.Input[str]
    containers: list[str]  # the on-demand containers the proxy's scaler starts and stops
    allow_from: str  # the one container allowed to connect (its name on the network)


class DockerGate(pulumi.ComponentResource):
    docker_host: str

    def __init__(self, resource_name: str, args: DockerGateArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:DockerGate", resource_name, None, opts)
        self.container = docker.Container(
            resource_name,
            name=NAME,
            image=pulled(f"{resource_name}-image", images.SOCKET_PROXY, self).image_id,
            command=gate_command(args.containers, args.allow_from),
            volumes=[docker.ContainerVolumeArgs(host_path=DOCKER_SOCKET, container_path=DOCKER_SOCKET, read_only=True)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=[NAME])],
            restart="unless-stopped",
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.docker_host = f"tcp://{NAME}:{PORT}"  # DOCKER_HOST for the proxy
        self.register_outputs({"docker_host": self.docker_host})
