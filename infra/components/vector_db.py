"""VectorDatabase: PostgreSQL with pgvector, for RAG. Never published: only containers on the
stack's network reach it."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from infra import images

from .common import pulled, secret_env

USER = "dreamseed"
DATABASE = "dreamseed"
PORT = 5432

# Run once, when the data volume is new. The documents table itself is created by the proxy
# at start-up (idempotently, with the embedding model's dimension), so it is defined in one place.
INIT_SQL = """\
CREATE EXTENSION IF NOT EXISTS vector;
"""


@dataclass
class VectorDatabaseArgs:
    network: pulumi.Input[str]
    password: pulumi.Input[str]
    # The data volume holds the ingested documents: protected, `pulumi destroy` refuses to delete it
    # (stack config protectData: false lifts that, on purpose).
    protect_data: bool = True


class VectorDatabase(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, resource_name: str, args: VectorDatabaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("dreamseed:index:VectorDatabase", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        name = "dreamseed-postgres"
        self.volume = docker.Volume(f"{resource_name}-data", name="dreamseed-postgres-data",
                                    opts=pulumi.ResourceOptions(parent=self, protect=args.protect_data))
        image = pulled(f"{resource_name}-image", images.POSTGRES_PGVECTOR, self)
        self.container = docker.Container(
            resource_name,
            name=name,
            image=image.image_id,
            envs=[f"POSTGRES_USER={USER}", f"POSTGRES_DB={DATABASE}", secret_env("POSTGRES_PASSWORD", args.password)],
            volumes=[docker.ContainerVolumeArgs(volume_name=self.volume.name, container_path="/var/lib/postgresql/data")],
            uploads=[docker.ContainerUploadArgs(file="/docker-entrypoint-initdb.d/001-extensions.sql", content=INIT_SQL)],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=args.network, aliases=["postgres"])],
            healthcheck=docker.ContainerHealthcheckArgs(
                tests=["CMD", "pg_isready", "-U", USER, "-d", DATABASE], interval="10s", timeout="5s", retries=5
            ),
            restart="unless-stopped",
            opts=child,
        )
        self.url = pulumi.Output.secret(
            pulumi.Output.concat("postgresql://", USER, ":", args.password, f"@{name}:{PORT}/{DATABASE}")
        )
        self.register_outputs({"url": self.url})
