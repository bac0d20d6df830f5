"""Monitoring for the Prometheus Operator (kube-prometheus-stack): ServiceMonitors for the proxy's
internal metrics port and the vLLM servers, and a PrometheusRule carrying the very alert and
recording rules the local stack gives its Prometheus (infra/monitoring.alert_rules: one generator,
two outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s
import yaml

from dreamseed.policy import Policies
from infra.monitoring import alert_rules

from .common import labels, metadata
from .proxy import NAME as PROXY


@dataclass
class MonitoringArgs:
    namespace: pulumi.Input[str]
    policies: Policies
    gpu_host: str
    model_servers: dict[str, str]  # backend -> its Deployment and Service
    # kube-prometheus-stack's Prometheus picks up objects with its Helm release's label by default.
    release_label: str


class Monitoring(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:Monitoring", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        release = {"release": args.release_label}

        def monitor(name: str, target: dict[str, str], port: str, job_labels: dict[str, str]) -> None:
            # The rules select by job and, for vLLM, by backend and on_demand, as the local stack's
            # scrape configs label them: the same labels here, so the same rules hold.
            k8s.apiextensions.CustomResource(
                f"{resource_name}-{name}", api_version="monitoring.coreos.com/v1", kind="ServiceMonitor",
                metadata={**metadata(name, args.namespace, "monitoring"),
                          "labels": {**labels(name, "monitoring"), **release}},
                spec={"selector": {"matchLabels": target},
                      "endpoints": [{"port": port, "path": "/metrics", "interval": "15s",
                                     "relabelings": [{"action": "replace", "targetLabel": label, "replacement": value}
                                                     for label, value in job_labels.items()]}]},
                opts=child)

        monitor(f"{PROXY}-metrics", labels(PROXY, "proxy"), "metrics", {"job": "dreamseed-proxy"})
        for backend, server in args.model_servers.items():
            on_demand = args.policies.catalog.backends[backend].on_demand
            monitor(server, labels(server, "model-server"), "http",
                    {"job": "vllm", "backend": backend, "on_demand": str(on_demand).lower()})
        self.rules = k8s.apiextensions.CustomResource(
            f"{resource_name}-rules", api_version="monitoring.coreos.com/v1", kind="PrometheusRule",
            metadata={**metadata("dreamseed-rules", args.namespace, "monitoring"),
                      "labels": {**labels("dreamseed-rules", "monitoring"), **release}},
            spec=yaml.safe_load(alert_rules(args.policies, args.gpu_host)),
            opts=child)
        self.register_outputs({})
