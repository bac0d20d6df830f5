"""NetworkPolicies: nothing in the namespace takes traffic unless a policy here allows it; the
model servers and the database take it from the proxy's pods only; the proxy from anywhere on its
API port, and its metrics port from the monitoring namespace's Prometheus. (A NetworkPolicy selects
pods by label and is enforced by the cluster's network plugin: Calico, Cilium...; one without
NetworkPolicy support ignores them, docs/kubernetes.md says so.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.components.embeddings import METRICS_PORT as EMBEDDINGS_METRICS_PORT
from infra.components.embeddings import PORT as EMBEDDINGS_PORT

from .common import METRICS_PORT, MODEL_PORT, PROXY_PORT, labels, metadata
from .database import NAME as DATABASE
from .proxy import NAME as PROXY


@dataclass
class NetworkPoliciesArgs:
    namespace: pulumi.Input[str]
    model_servers: list[str]  # their Deployments' names
    monitoring_namespace: str
    embedding_servers: list[str] = field(default_factory=list)  # the same, for the embedding server if any


class NetworkPolicies(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: NetworkPoliciesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:NetworkPolicies", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        proxy_pods = {"podSelector": {"matchLabels": labels(PROXY, "proxy")}}
        prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": args.monitoring_namespace}}}

        def allow(name: str, pods: dict[str, str], sources: list[dict[str, Any]], ports: list[int]) -> None:
            k8s.networking.v1.NetworkPolicy(
                f"{resource_name}-{name}", metadata=metadata(f"dreamseed-{name}", args.namespace, "network"),
                spec={"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"],
                      "ingress": [{"from": sources, "ports": [{"port": port, "protocol": "TCP"} for port in ports]}]},
                opts=child)

        k8s.networking.v1.NetworkPolicy(
            f"{resource_name}-default-deny", metadata=metadata("dreamseed-default-deny", args.namespace, "network"),
            spec={"podSelector": {}, "policyTypes": ["Ingress"]}, opts=child)
        for server in args.model_servers:
            allow(f"{server.removeprefix('dreamseed-')}-from-proxy", labels(server, "model-server"),
                  [proxy_pods, prometheus], [MODEL_PORT])
        for server in args.embedding_servers:
            allow(f"{server.removeprefix('dreamseed-')}-from-proxy", labels(server, "embeddings"),
                  [proxy_pods, prometheus], [EMBEDDINGS_PORT, EMBEDDINGS_METRICS_PORT])
        allow("postgres-from-proxy", labels(DATABASE, "database"), [proxy_pods], [5432])
        k8s.networking.v1.NetworkPolicy(
            f"{resource_name}-proxy", metadata=metadata("dreamseed-proxy-ingress", args.namespace, "network"),
            spec={"podSelector": {"matchLabels": labels(PROXY, "proxy")}, "policyTypes": ["Ingress"],
                  "ingress": [{"ports": [{"port": PROXY_PORT, "protocol": "TCP"}]},
                              {"from": [prometheus], "ports": [{"port": METRICS_PORT, "protocol": "TCP"}]}]},
            opts=child)
        self.register_outputs({})
