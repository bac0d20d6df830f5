"""VectorDatabase: PostgreSQL with pgvector as a one-pod StatefulSet with its own volume, reachable
only from the proxy (network.py).

A StatefulSet rather than a CloudNativePG `Cluster`: the same image and one instance as the local
stack, no operator to install first, and nothing a cluster without CRD rights cannot run. A team that
wants replicas, failover and backups runs CloudNativePG (or a managed Postgres) and gives the stack
its URL instead (`dreamseed:databaseUrl`)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from infra import images
from infra.components.vector_db import DATABASE, INIT_SQL, PORT, USER

from .common import labels, metadata

NAME = "dreamseed-postgres"


@dataclass
class VectorDatabaseArgs:
    namespace: pulumi.Input[str]
    password: pulumi.Input[str]
    storage_class: str | None
    size_gib: int


class VectorDatabase(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, resource_name: str, args: VectorDatabaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:k8s:VectorDatabase", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        selector = labels(NAME, "database")
        self.secret = k8s.core.v1.Secret(
            f"{resource_name}-password", metadata=metadata(f"{NAME}-password", args.namespace, "database"),
            string_data={"POSTGRES_PASSWORD": args.password}, opts=child)
        self.init = k8s.core.v1.ConfigMap(
            f"{resource_name}-init", metadata=metadata(f"{NAME}-init", args.namespace, "database"),
            data={"001-extensions.sql": INIT_SQL}, opts=child)
        self.service = k8s.core.v1.Service(
            f"{resource_name}-service", metadata=metadata(NAME, args.namespace, "database"),
            spec={"clusterIP": "None", "selector": selector, "ports": [{"name": "postgres", "port": PORT}]},
            opts=child)
        self.stateful_set = k8s.apps.v1.StatefulSet(
            resource_name,
            metadata=metadata(NAME, args.namespace, "database"),
            spec={
                "serviceName": NAME,
                "replicas": 1,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": selector},
                    "spec": {"containers": [{
                        "name": "postgres",
                        "image": images.POSTGRES_PGVECTOR,
                        "env": [{"name": "POSTGRES_USER", "value": USER}, {"name": "POSTGRES_DB", "value": DATABASE},
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
                        "envFrom": [{"secretRef": {"name": self.secret.metadata["name"]}}],
                        "ports": [{"name": "postgres", "containerPort": PORT}],
                        "readinessProbe": {"exec": {"command": ["pg_isready", "-U", USER, "-d", DATABASE]},
                                           "periodSeconds": 10},
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                                         {"name": "init", "mountPath": "/docker-entrypoint-initdb.d"}],
                    }], "volumes": [{"name": "init", "configMap": {"name": self.init.metadata["name"]}}]},
                },
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": args.storage_class,
                             "resources": {"requests": {"storage": f"{args.size_gib}Gi"}}},
                }],
                # `pulumi destroy` deletes the StatefulSet, never the claim holding the documents.
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            },
            opts=child)
        self.url = pulumi.Output.secret(pulumi.Output.concat(
            "postgresql://", USER, ":", args.password, f"@{NAME}:{PORT}/{DATABASE}"))
        self.register_outputs({"url": self.url})
