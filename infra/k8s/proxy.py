"""EdgeProxy: the DreamSeed proxy as a Deployment of two or more pods behind a Service, with a
PodDisruptionBudget, its policies from a ConfigMap and its keys from a Secret, and a service account
whose Role allows exactly the scaler's calls: get and patch `deployments/scale` of the on-demand
backends' Deployments (the Kubernetes counterpart of the local stack's Docker gate)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_kubernetes as k8s
import yaml

from .common import METRICS_PORT, PROXY_PORT, labels, metadata

NAME = "dreamseed-proxy"
POLICY_DIR = "/etc/dreamseed/policies"


def policy_files(directory: Path, scale_actuators: dict[str, str], discovered: list[str] | None = None) -> dict[str, str]:
    """The policy files for the ConfigMap. scale.yaml's actuators say how to start a backend on a
    Docker host; on the cluster each on-demand backend is its Deployment, scaled by the kubernetes
    actuator, so those are written in. The backends the stack runs as Deployments get `discover:
    dns`: their headless Service's addresses are their replicas. The rest of the files as they are."""
    files = {path.name: path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.yaml"))}
    if discovered and "backends.yaml" in files:
        catalog = yaml.safe_load(files["backends.yaml"])
        for backend in discovered:
            catalog["backends"][backend]["discover"] = "dns"
        files["backends.yaml"] = ("# Written by the k8s stack from policies/backends.yaml: the backends it runs are "
                                  "found by DNS.\n" + yaml.safe_dump(catalog, allow_unicode=True, sort_keys=False))
    if scale_actuators and "scale.yaml" in files:
        scale = yaml.safe_load(files["scale.yaml"]) or {}
        for backend, deployment in scale_actuators.items():
            scale.setdefault("backends", {}).setdefault(backend, {})["actuator"] = {
                "kind": "kubernetes", "deployment": deployment}
        files["scale.yaml"] = ("# Written by the k8s stack from policies/scale.yaml: on-demand backends are scaled "
                               "as Deployments.\n" + yaml.safe_dump(scale, allow_unicode=True, sort_keys=False))
    return files


def content_hash(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name, text in sorted(files.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:10]


@dataclass
class EdgeProxyArgs:
    namespace: pulumi.Input[str]
    image: str
    policies: dict[str, str]  # file name -> text, as the ConfigMap carries them
    env: dict[str, pulumi.Input[str]]  # plain settings: the backends' URLs
    secret_env: dict[str, pulumi.Input[str]]  # DATABASE_URL, keys
    scaled_deployments: list[str] = field(default_factory=list)  # what the Role lets the scaler scale
    replicas: int = 2


class EdgeProxy(pulumi.ComponentResource):
    def __init__(self, resource_name: str, args: EdgeProxyArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:EdgeProxy", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        selector = labels(NAME, "proxy")
        # The name carries the content's hash: a policy pull request makes a new ConfigMap, the pod
        # template refers to it, and the Deployment rolls its pods one by one (the old map stays
        # until the rollout is done).
        self.policy_hash = content_hash(args.policies)
        self.config_map = k8s.core.v1.ConfigMap(
            f"{resource_name}-policies",
            metadata=metadata(f"{NAME}-policies-{self.policy_hash}", args.namespace, "policies"),
            data=args.policies, opts=child)
        self.secret = k8s.core.v1.Secret(
            f"{resource_name}-secrets", metadata=metadata(f"{NAME}-secrets", args.namespace, "proxy"),
            string_data=args.secret_env, opts=child)
        self.account = k8s.core.v1.ServiceAccount(
            f"{resource_name}-account", metadata=metadata(NAME, args.namespace, "proxy"),
            # The token is mounted only because the scaler calls the API; without on-demand backends it is not.
            automount_service_account_token=bool(args.scaled_deployments), opts=child)
        if args.scaled_deployments:
            self.role = k8s.rbac.v1.Role(
                f"{resource_name}-scaler", metadata=metadata(f"{NAME}-scaler", args.namespace, "proxy"),
                rules=[{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                        "resourceNames": list(args.scaled_deployments), "verbs": ["get", "patch"]}],
                opts=child)
            k8s.rbac.v1.RoleBinding(
                f"{resource_name}-scaler", metadata=metadata(f"{NAME}-scaler", args.namespace, "proxy"),
                role_ref={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{NAME}-scaler"},
                subjects=[{"kind": "ServiceAccount", "name": NAME, "namespace": args.namespace}],
                opts=child)
        health = {"httpGet": {"path": "/healthz", "port": METRICS_PORT}}
        self.deployment = k8s.apps.v1.Deployment(
            resource_name,
            metadata=metadata(NAME, args.namespace, "proxy"),
            spec={
                "replicas": args.replicas,
                "selector": {"matchLabels": selector},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {"labels": selector, "annotations": {"dreamseed/policy-hash": self.policy_hash}},
                    "spec": {
                        "serviceAccountName": NAME,
                        "containers": [{
                            "name": "proxy",
                            "image": args.image,
                            "args": ["serve", "--host", "0.0.0.0", "--port", str(PROXY_PORT), "--policies", POLICY_DIR,
                                     "--metrics-host", "0.0.0.0", "--metrics-port", str(METRICS_PORT)],
                            "ports": [{"name": "http", "containerPort": PROXY_PORT},
                                      {"name": "metrics", "containerPort": METRICS_PORT}],
                            "env": [{"name": k, "value": v} for k, v in sorted(args.env.items())],
                            "envFrom": [{"secretRef": {"name": self.secret.metadata["name"]}}],
                            "volumeMounts": [{"name": "policies", "mountPath": POLICY_DIR, "readOnly": True}],
                            # Ready whether or not a backend is up: it answers either way (fallback, errors).
                            "readinessProbe": {**health, "periodSeconds": 5},
                            "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3},
                            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
                            # The image's user (infra/proxy.Dockerfile: uid 10001) by number: a named USER
                            # cannot be checked against runAsNonRoot.
                            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                                "allowPrivilegeEscalation": False},
                        }],
                        "volumes": [{"name": "policies", "configMap": {"name": self.config_map.metadata["name"]}}],
                    },
                },
            },
            opts=child)
        self.budget = k8s.policy.v1.PodDisruptionBudget(
            f"{resource_name}-budget", metadata=metadata(NAME, args.namespace, "proxy"),
            spec={"minAvailable": 1, "selector": {"matchLabels": selector}}, opts=child)
        self.service = k8s.core.v1.Service(
            f"{resource_name}-service", metadata=metadata(NAME, args.namespace, "proxy"),
            spec={"selector": selector, "ports": [{"name": "http", "port": PROXY_PORT, "targetPort": PROXY_PORT},
                                                  {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]},
            opts=child)
        self.register_outputs({"policyHash": self.policy_hash})
