"""DockerGate: the only way the proxy reaches the Docker Engine API.

The proxy faces the internet; a process that holds the raw Docker socket is root on the host. The
scaler needs three calls on the on-demand containers this stack declared (start, stop, inspect), so
a socket proxy (wollomatic/socket-proxy: per-method allowlists of anchored regular expressions on
the request path) holds the socket, read-only, and lets exactly those through, only from the proxy
container. Anything else (listing containers, creating one, exec, another container's start) gets
403 without reaching Docker.

socket-proxy's image runs as 65534:65534 and the socket is root:docker, mode 0660 (Docker's
post-install docs), so the container runs in the socket's group, as socket-proxy's README says
(`user: "65534:<docker gid>"`); otherwise its start-up check cannot open the socket, and it exits
and restarts forever.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images

from .common import pulled

NAME = "dreamseed-docker-gate"
PORT = 2375
DOCKER_SOCKET = "/var/run/docker.sock"
API_VERSION = r"/v1\.[0-9]{2}"  # the actuator's /v1.43/...; any 1.xx Docker accepts
NOBODY = 65534  # the image's own user


def socket_group(docker_host: str, configured: int | None) -> int:
    """The gid owning the Docker socket the gate mounts: `dockerSocketGid` when set, else read
    from the socket itself when the Docker host is this machine (the docker group's number differs
    from host to host). A remote Docker host must say it: preview cannot look there."""
    if configured is not None:
        return configured
    if not docker_host.startswith("unix://"):
        raise pulumi.RunError(
            f"dockerHost is {docker_host}: set dreamseed:dockerSocketGid to the group owning {DOCKER_SOCKET} on that "
            f"host (`stat -c %g {DOCKER_SOCKET}` there), so the Docker gate may open the socket")
    path = docker_host.removeprefix("unix://")
    try:
        found = os.stat(path)
    except OSError as exc:
        raise pulumi.RunError(f"cannot read the Docker socket {path} ({exc.strerror}): is Docker running here? "
                              "Or set dreamseed:dockerSocketGid to the group owning it") from None
    if not stat.S_ISSOCK(found.st_mode):
        raise pulumi.RunError(f"{path} is not a socket: set dockerHost to the Docker Engine's socket")
    return found.st_gid


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
    socket_gid: int  # the Docker socket's group on the host (socket_group)


class DockerGate(pulumi.ComponentResource):
    docker_host: str

    def __init__(self, resource_name: str, args: DockerGateArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:DockerGate", resource_name, None, opts)
        self.container = docker.Container(
            resource_name,
            name=NAME,
            image=pulled(f"{resource_name}-image", images.SOCKET_PROXY, self).image_id,
            command=gate_command(args.containers, args.allow_from),
            user=f"{NOBODY}:{args.socket_gid}",
            volumes=[docker.ContainerVolumeArgs(host_path=DOCKER_SOCKET, container_path=DOCKER_SOCKET, read_only=True)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=[NAME])],
            restart="unless-stopped",
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.docker_host = f"tcp://{NAME}:{PORT}"  # DOCKER_HOST for the proxy
        self.register_outputs({"docker_host": self.docker_host})
