"""Monitoring: Prometheus scraping the proxy, every vLLM server (the remote 70B through its
tunnel), the GPU exporter and the embedding server, with the SLO alert rules; Alertmanager sending
the alerts to the team's webhook; Grafana with the DreamSeed dashboard. The configuration itself is
generated from the catalog by infra.monitoring.

Prometheus, Alertmanager and the GPU exporter are not published; Grafana listens on 127.0.0.1 only
(reach it through SSH).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_docker as docker

from infra import images
from infra.monitoring import (
    alertmanager_config,
    dashboard_json,
    grafana_dashboard_provider,
    grafana_datasource,
    prometheus_config,
)

from .common import pulled, secret_env

PROMETHEUS_PORT = 9090
ALERTMANAGER = "dreamseed-alertmanager:9093"
GPU_EXPORTER = "dreamseed-gpu-exporter:9400"
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
    remote_vllm_targets: dict[str, str] = field(default_factory=dict)  # backend -> host:port (its tunnel)
    embeddings_target: str | None = None  # the embedding server's metrics, when the stack runs one
    alert_webhook_url: pulumi.Input[str] | None = None  # where Alertmanager sends alerts (a secret)


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
            uploads=[docker.ContainerUploadArgs(file="/etc/prometheus/prometheus.yml", content=prometheus_config(
                args.proxy_target, args.vllm_targets, remote_vllm_targets=args.remote_vllm_targets,
                gpu_exporter=GPU_EXPORTER, embeddings=args.embeddings_target, alertmanager=ALERTMANAGER)),
                     docker.ContainerUploadArgs(file="/etc/prometheus/rules.yml", content=args.rules)],
            volumes=[docker.ContainerVolumeArgs(volume_name=self.prometheus_volume.name, container_path="/prometheus")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["prometheus"])],
            restart="unless-stopped",
            opts=child,
        )
        # The webhook URL often holds a token (Slack, a pager): the whole file is a secret.
        alerting = (pulumi.Output.secret(args.alert_webhook_url).apply(alertmanager_config)
                    if args.alert_webhook_url is not None else alertmanager_config(None))
        self.alertmanager = docker.Container(
            f"{resource_name}-alertmanager",
            name=ALERTMANAGER.split(":")[0],
            image=pulled(f"{resource_name}-alertmanager-image", images.ALERTMANAGER, self).image_id,
            command=["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"],
            uploads=[docker.ContainerUploadArgs(file="/etc/alertmanager/alertmanager.yml", content=alerting)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["alertmanager"])],
            restart="unless-stopped",
            opts=child,
        )
        self.gpu_exporter = docker.Container(
            f"{resource_name}-gpu-exporter",
            name=GPU_EXPORTER.split(":")[0],
            image=pulled(f"{resource_name}-gpu-exporter-image", images.GPU_EXPORTER, self).image_id,
            device_requests=[docker.ContainerDeviceRequestArgs(driver="nvidia", count=-1, capabilities=["gpu"])],
            # No added capability: the dashboard reads DCGM's default DEV_* fields; the profiling
            # counters that would need CAP_SYS_ADMIN are not offered on GeForce cards (NVIDIA/dcgm-exporter#404).
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["gpu-exporter"])],
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
