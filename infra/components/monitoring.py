"""Monitoring: Prometheus scraping the proxy and every vLLM server, with the SLO alert rules,
and Grafana with the DreamSeed dashboard. The configuration itself is generated from the
catalog by infra.monitoring.

Prometheus is not published; Grafana listens on 127.0.0.1 only (reach it through SSH).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images
from infra.monitoring import dashboard_json, grafana_dashboard_provider, grafana_datasource, prometheus_config

from .common import pulled, secret_env

PROMETHEUS_PORT = 9090
DASHBOARDS = "/var/lib/grafana/dashboards"


@dataclass
class MonitoringArgs:
    network: pulumi.Input[str]
    proxy_target: str
    vllm_targets: dict[str, tuple[str, bool]]  # backend -> (host:port, on demand)
    rules: str  # infra.monitoring.alert_rules(...)
    grafana_port: int
    grafana_admin_password: pulumi.Input[str]
    protect_data: bool = True  # Prometheus's history: `pulumi destroy` refuses to delete it unless lifted


class Monitoring(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:Monitoring", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        prometheus_name = "dreamseed-prometheus"
        self.prometheus_volume = docker.Volume(f"{resource_name}-prometheus-data", name="dreamseed-prometheus-data",
                                               opts=pulumi.ResourceOptions(parent=self, protect=args.protect_data))
        self.prometheus = docker.Container(
            f"{resource_name}-prometheus",
            name=prometheus_name,
            image=pulled(f"{resource_name}-prometheus-image", images.PROMETHEUS, self).image_id,
            command=["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                     "--storage.tsdb.retention.time=30d"],
            uploads=[docker.ContainerUploadArgs(file="/etc/prometheus/prometheus.yml",
                                                content=prometheus_config(args.proxy_target, args.vllm_targets)),
                     docker.ContainerUploadArgs(file="/etc/prometheus/rules.yml", content=args.rules)],
            volumes=[docker.ContainerVolumeArgs(volume_name=self.prometheus_volume.name, container_path="/prometheus")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["prometheus"])],
            restart="unless-stopped",
            opts=child,
        )
        self.grafana_volume = docker.Volume(f"{resource_name}-grafana-data", name="dreamseed-grafana-data", opts=child)
        self.grafana = docker.Container(
            f"{resource_name}-grafana",
            name="dreamseed-grafana",
            image=pulled(f"{resource_name}-grafana-image", images.GRAFANA, self).image_id,
            envs=[secret_env("GF_SECURITY_ADMIN_PASSWORD", args.grafana_admin_password), "GF_USERS_ALLOW_SIGN_UP=false"],
            uploads=[
                docker.ContainerUploadArgs(file="/etc/grafana/provisioning/datasources/prometheus.yaml",
                                           content=grafana_datasource(f"http://{prometheus_name}:{PROMETHEUS_PORT}")),
                docker.ContainerUploadArgs(file="/etc/grafana/provisioning/dashboards/dreamseed.yaml",
                                           content=grafana_dashboard_provider(DASHBOARDS)),
                docker.ContainerUploadArgs(file=f"{DASHBOARDS}/dreamseed.json", content=dashboard_json()),
            ],
            volumes=[docker.ContainerVolumeArgs(volume_name=self.grafana_volume.name, container_path="/var/lib/grafana")],
            ports=[docker.ContainerPortArgs(internal=3000, external=args.grafana_port, ip="127.0.0.1")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["grafana"])],
            restart="unless-stopped",
            opts=child,
        )
        self.register_outputs({})
