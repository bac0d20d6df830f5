"""Monitoring: Prometheus scraping the proxy and every vLLM server, and Grafana on top.

Prometheus is not published; Grafana listens on 127.0.0.1 only (reach it through SSH).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker
import yaml

from infra import images

from .common import pulled, secret_env

PROMETHEUS_PORT = 9090


def prometheus_config(proxy_target: str, backend_targets: dict[str, str]) -> str:
    """Scrape jobs generated from the catalog: the proxy, and each vLLM server labelled with its
    backend name (vLLM's own metrics carry only `model_name`)."""
    config = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {"job_name": "dreamseed-proxy", "static_configs": [{"targets": [proxy_target]}]},
            {
                "job_name": "vllm",
                "static_configs": [
                    {"targets": [target], "labels": {"backend": name}} for name, target in sorted(backend_targets.items())
                ],
            },
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def grafana_datasource(prometheus_url: str) -> str:
    return yaml.safe_dump({
        "apiVersion": 1,
        "datasources": [{"name": "Prometheus", "type": "prometheus", "access": "proxy", "url": prometheus_url,
                         "isDefault": True, "uid": "prometheus"}],
    }, sort_keys=False)


@dataclass
class MonitoringArgs:
    network: pulumi.Input[str]
    proxy_target: str
    backend_targets: dict[str, str]
    grafana_port: int
    grafana_admin_password: pulumi.Input[str]


class Monitoring(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:Monitoring", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        prometheus_name = "dreamseed-prometheus"
        self.prometheus_volume = docker.Volume(f"{resource_name}-prometheus-data", name="dreamseed-prometheus-data", opts=child)
        self.prometheus = docker.Container(
            f"{resource_name}-prometheus",
            name=prometheus_name,
            image=pulled(f"{resource_name}-prometheus-image", images.PROMETHEUS, self).image_id,
            command=["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                     "--storage.tsdb.retention.time=30d"],
            uploads=[docker.ContainerUploadArgs(file="/etc/prometheus/prometheus.yml",
                                                content=prometheus_config(args.proxy_target, args.backend_targets))],
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
            uploads=[docker.ContainerUploadArgs(
                file="/etc/grafana/provisioning/datasources/prometheus.yaml",
                content=grafana_datasource(f"http://{prometheus_name}:{PROMETHEUS_PORT}"),
            )],
            volumes=[docker.ContainerVolumeArgs(volume_name=self.grafana_volume.name, container_path="/var/lib/grafana")],
            ports=[docker.ContainerPortArgs(internal=3000, external=args.grafana_port, ip="127.0.0.1")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["grafana"])],
            restart="unless-stopped",
            opts=child,
        )
        self.register_outputs({})
