"""RemoteTunnel: the remote 70B (remote70b stack) reached from the cluster as the local stack
reaches it: a Deployment holding the SSH port-forward (the same script, the same restricted key and
pinned host key, infra/components/tunnel.py), and a Service the proxy calls."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from infra import images
from infra.components.tunnel import TUNNEL_SCRIPT

from .common import labels, metadata

PORT = 8000


@dataclass
class RemoteTunnelArgs:
    namespace: pulumi.Input[str]
    alias: str
    ssh_host: pulumi.Input[str]
    ssh_user: pulumi.Input[str]
    tunnel_private_key: pulumi.Input[str]
    ssh_host_key: pulumi.Input[str]
    remote_port: pulumi.Input[int]


class RemoteTunnel(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: RemoteTunnelArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:RemoteTunnel", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        name = f"dreamseed-tunnel-{args.alias}"
        selector = labels(name, "tunnel")
        secret = k8s.core.v1.Secret(f"{resource_name}-key", metadata=metadata(f"{name}-key", args.namespace, "tunnel"),
                                    string_data={"SSH_PRIVATE_KEY": args.tunnel_private_key}, opts=child)
        env = {"SSH_USER": args.ssh_user, "SSH_HOST": args.ssh_host, "SSH_HOST_KEY": args.ssh_host_key,
               "SSH_PORT": "22", "LOCAL_PORT": str(PORT),
               # Numbers read from another stack arrive as floats (8000.0): make it a port again.
               "REMOTE_PORT": pulumi.Output.from_input(args.remote_port).apply(lambda p: str(int(p)))}
        k8s.apps.v1.Deployment(
            resource_name, metadata=metadata(name, args.namespace, "tunnel"),
            spec={"replicas": 1, "selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": selector}, "spec": {"containers": [{
                      "name": "ssh", "image": images.TUNNEL, "command": ["sh", "-c", TUNNEL_SCRIPT],
                      "env": [{"name": k, "value": v} for k, v in env.items()],
                      "envFrom": [{"secretRef": {"name": secret.metadata["name"]}}],
                      "ports": [{"name": "http", "containerPort": PORT}]}]}}},
            opts=child)
        k8s.core.v1.Service(f"{resource_name}-service", metadata=metadata(name, args.namespace, "tunnel"),
                            spec={"selector": selector, "ports": [{"name": "http", "port": PORT}]}, opts=child)
        self.url = f"http://{name}:{PORT}"
        self.register_outputs({"url": self.url})
