"""SshTunnel: reach a server that listens only on a remote host's loopback, through SSH.

The remote 70B's vLLM is bound to 127.0.0.1 on its host, so nothing on the internet can reach
it; this container holds an SSH port-forward to it and the proxy talks to the container. SSH
encrypts the traffic and the API key authenticates the requests. The tunnel logs in with a key
that can do nothing but forward to that one port (remote_gpu.tunnel_access_script makes it), and
checks the host against the host key the remote stack read when it created the instance: a
restart never trusts a new host key blindly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images

from .common import pulled, secret_env

# Reconnects are Docker's job (restart: always); ServerAlive makes a dead link exit quickly. Only
# the pinned host key is accepted. LOCAL_BIND is 0.0.0.0 in the container (the proxy reaches it over
# the Docker network; nothing publishes the port).
SSH_SCRIPT = """\
set -eu
umask 077
dir=$(mktemp -d)
printf '%s\\n' "$SSH_PRIVATE_KEY" > "$dir/id"
if [ "$SSH_PORT" = 22 ]; then known="$SSH_HOST"; else known="[$SSH_HOST]:$SSH_PORT"; fi
printf '%s %s\\n' "$known" "$SSH_HOST_KEY" > "$dir/known_hosts"
exec ssh -i "$dir/id" -N -o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -o ServerAliveCountMax=3 \\
  -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$dir/known_hosts" -o IdentitiesOnly=yes -o BatchMode=yes \\
  -p "$SSH_PORT" -L "${LOCAL_BIND:-0.0.0.0}:$LOCAL_PORT:127.0.0.1:$REMOTE_PORT" "$SSH_USER@$SSH_HOST"
"""
TUNNEL_SCRIPT = "apk add --no-cache openssh-client >/dev/null\n" + SSH_SCRIPT


@dataclass
class SshTunnelArgs:
    network: pulumi.Input[str]
    alias: str
    ssh_host: pulumi.Input[str]
    ssh_user: pulumi.Input[str]
    # The remote stack's restricted tunnel key and the host key it read from the instance.
    tunnel_private_key: pulumi.Input[str]
    ssh_host_key: pulumi.Input[str]
    remote_port: pulumi.Input[int]
    local_port: int = 8000
    ssh_port: int = 22


class SshTunnel(pulumi.ComponentResource):
    internal_url: str

    def __init__(self, resource_name: str, args: SshTunnelArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:SshTunnel", resource_name, None, opts)
        name = f"dreamseed-tunnel-{args.alias}"
        self.container = docker.Container(
            resource_name,
            name=name,
            image=pulled(f"{resource_name}-image", images.TUNNEL, self).image_id,
            command=["sh", "-c", TUNNEL_SCRIPT],
            envs=[
                secret_env("SSH_PRIVATE_KEY", args.tunnel_private_key),
                pulumi.Output.concat("SSH_USER=", args.ssh_user),
                pulumi.Output.concat("SSH_HOST=", args.ssh_host),
                pulumi.Output.concat("SSH_HOST_KEY=", args.ssh_host_key),
                f"SSH_PORT={args.ssh_port}",
                f"LOCAL_PORT={args.local_port}",
                # Numbers read from another stack arrive as floats (8000.0): make it a port again.
                pulumi.Output.concat("REMOTE_PORT=", pulumi.Output.from_input(args.remote_port).apply(lambda p: str(int(p)))),
            ],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=[args.alias])],
            restart="always",
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.internal_url = f"http://{name}:{args.local_port}"
        self.register_outputs({"internal_url": self.internal_url})
