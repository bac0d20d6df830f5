"""Pulumi unit tests with `pulumi.runtime.set_mocks`: programs run for real, resources are
recorded instead of created (no CLI or cloud exists here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pytest

SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's wire marker for a secret value

SECRETS = {
    "hfToken": "hf_SECRET_TOKEN_123",
    "postgresPassword": "pg-SECRET-pass",
    "grafanaAdminPassword": "grafana-SECRET",
    "proxyApiKeys": "client-SECRET-key",
    "proxyAdminKey": "admin-SECRET-key",
    "sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----SECRETKEY",
    "lambdaApiKey": "lambda-SECRET-api",
    "vllmApiKey": "vllm-SECRET-api",
}

INSTANCE = {"id": "0920582c7ff041399e34823a0be62549", "ip": "198.51.100.7", "name": "dreamseed-70b",
            "region": "us-west-2", "instance_type": "gpu_2x_a100"}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyOfTheRentedInstanceForPinning"
TUNNEL_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----TUNNEL-SECRET-KEY"
REMOTE_OUTPUTS = {"publicIp": INSTANCE["ip"], "sshUser": "ubuntu", "port": 8000, "apiKey": SECRETS["vllmApiKey"],
                  "url": "http://127.0.0.1:8000", "backend": "general70", "sshHostKey": HOST_KEY,
                  "tunnelPrivateKey": TUNNEL_KEY}


@dataclass
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]
    parent: str = ""  # the parent's URN, from the monitor
    dependencies: tuple[str, ...] = ()
    delete_before_replace: bool = False
    protect: bool = False
    provider: str = ""  # the provider reference (URN::id), from the monitor: which Docker engine, say


class RecordingMonitor(pulumi.runtime.mocks.MockMonitor):
    """Mocks see inputs only; the monitor also sees parent, dependencies, deleteBeforeReplace and protect."""

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.requests: dict[tuple[str, str], Any] = {}

    def RegisterResource(self, request: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        self.requests[(request.type, request.name)] = (
            request.parent, tuple(request.dependencies), request.deleteBeforeReplace, request.protect, request.provider
        )
        return super().RegisterResource(request)


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    resources: list[Recorded] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Recorded(args.typ, args.name, args.inputs))
        outputs = dict(args.inputs)
        if args.typ == "command:local:Command":
            outputs["stdout"] = json.dumps(INSTANCE)
        elif args.typ == "command:remote:Command" and args.name.endswith("tunnel-access"):
            outputs["stdout"] = json.dumps({"tunnel_key": TUNNEL_KEY})
        elif args.typ == "command:remote:Command" and args.name.endswith("host-key"):
            outputs["stdout"] = HOST_KEY
        elif args.typ == "pulumi:pulumi:StackReference":
            outputs["outputs"] = REMOTE_OUTPUTS
        elif args.typ == "docker:index/remoteImage:RemoteImage":
            outputs["imageId"] = f"sha256:{args.inputs['name']}"
        elif args.typ == "docker:index/image:Image":  # a local build: the digest of what was built
            outputs["repoDigest"] = f"{args.inputs['imageName'].split(':')[0]}@sha256:{'ab' * 32}"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}

    def attach(self, monitor: RecordingMonitor) -> None:
        for record in self.resources:
            parent, dependencies, dbr, protect, provider = monitor.requests.get(
                (record.type, record.name), ("", (), False, False, ""))
            record.parent, record.dependencies, record.delete_before_replace, record.protect, record.provider = (
                parent, dependencies, dbr, protect, provider)

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == typ]

    def get(self, typ: str, name: str) -> Recorded:
        return next(r for r in self.resources if r.type == typ and r.name == name)


def stack_config(stack: str) -> dict[str, str]:
    common = {"dreamseed:hfToken": SECRETS["hfToken"], "dreamseed:sshPrivateKey": SECRETS["sshPrivateKey"]}
    if stack == "local":
        return {**common, "dreamseed:postgresPassword": SECRETS["postgresPassword"],
                "dreamseed:grafanaAdminPassword": SECRETS["grafanaAdminPassword"],
                "dreamseed:proxyApiKeys": SECRETS["proxyApiKeys"], "dreamseed:proxyAdminKey": SECRETS["proxyAdminKey"],
                "dreamseed:remoteStack": "organization/dreamseed/remote70b",
                # The docker group's number on the host (no Docker socket here to read it from).
                "dreamseed:dockerSocketGid": "998"}
    if stack == "k8s":
        return {**common, "dreamseed:postgresPassword": SECRETS["postgresPassword"],
                "dreamseed:proxyApiKeys": SECRETS["proxyApiKeys"], "dreamseed:proxyAdminKey": SECRETS["proxyAdminKey"],
                "dreamseed:proxyImage": "registry.example.com/dreamseed/proxy:0.3.0",
                "dreamseed:remoteStack": "organization/dreamseed/remote70b"}
    return {**common, "dreamseed:lambdaApiKey": SECRETS["lambdaApiKey"], "dreamseed:vllmApiKey": SECRETS["vllmApiKey"],
            "dreamseed:sshKeyName": "dreamseed"}


Runner = Callable[..., tuple[RecordingMocks, dict[str, Any]]]


@pytest.fixture
def run_stack() -> Iterator[Runner]:
    """Run a stack program under mocks; returns the recorded resources and the program's outputs
    with each output resolved to (value, is_secret)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # Pulumi uses the thread's current loop

    def run(stack: str, extra_config: dict[str, str | None] | None = None,
            preview: bool = False) -> tuple[RecordingMocks, dict[str, Any]]:
        from infra.config import LocalConfig, RemoteConfig
        from infra.program import build_local, build_remote

        mocks = RecordingMocks()
        monitor = RecordingMonitor(mocks)
        pulumi.runtime.set_mocks(mocks, project="dreamseed", stack=stack, preview=preview, monitor=monitor)
        # A None in extra_config removes that key (a setting the operator did not make).
        config = {k: v for k, v in {**stack_config(stack), **(extra_config or {})}.items() if v is not None}
        secret_keys = [f"dreamseed:{k}" for k in SECRETS]
        pulumi.runtime.set_all_config(config, secret_keys)
        resolved: dict[str, Any] = {}

        @pulumi.runtime.test
        def program() -> pulumi.Output[Any]:
            if stack == "k8s":
                from infra.config import K8sConfig
                from infra.k8s.program import build_k8s

                outputs = build_k8s(K8sConfig.load())
            else:
                outputs = build_local(LocalConfig.load()) if stack == "local" else build_remote(RemoteConfig.load())

            async def settle(key: str, value: Any) -> None:
                output = pulumi.Output.from_input(value)
                resolved[key] = (await output.future(), await output.is_secret())

            return pulumi.Output.from_input(
                asyncio.gather(*(settle(k, v) for k, v in outputs.items()))
            )

        program()
        mocks.attach(monitor)
        return mocks, resolved

    yield run
    loop.close()


def remote_command(mocks: RecordingMocks, name: str) -> Recorded:
    (found,) = [r for r in mocks.of_type("command:remote:Command") if r.name == name]
    return found


def plain_occurrences(value: Any, needle: str) -> int:
    """How often `needle` appears in a wire-format value outside a secret wrapper."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            return 0
        return sum(plain_occurrences(v, needle) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(plain_occurrences(v, needle) for v in value)
    return int(isinstance(value, str) and needle in value)


def secret_occurrences(value: Any, needle: str) -> int:
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            return int(needle in json.dumps(value.get("value")))
        return sum(secret_occurrences(v, needle) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(secret_occurrences(v, needle) for v in value)
    return 0
