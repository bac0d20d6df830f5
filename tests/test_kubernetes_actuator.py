"""The kubernetes actuator against a fake API server that answers as the real one does
(tests/fake_kubernetes.py), and through a real proxy whose scaler starts and stops the coder by it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from dreamseed.policy import KubernetesActuator
from dreamseed.scaling import ActuatorError
from dreamseed.scaling.actuators import KubernetesDeployment
from fake_kubernetes import FakeKubernetes
from support import pipe, start_proxy, start_sim, write_policies

TOKEN = "service-account-token"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeKubernetes, dict[str, str]]]:
    fake = FakeKubernetes(TOKEN, deployments={"dreamseed-code": {"replicas": 0, "version": 7},
                                              "dreamseed-general": {"replicas": 1, "version": 3}},
                          role={("get", "deployments/scale", "dreamseed-code"),
                                ("patch", "deployments/scale", "dreamseed-code")})
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "namespace").write_text("dreamseed")
    try:
        yield fake, {"DREAMSEED_KUBERNETES_API": fake.url, "DREAMSEED_KUBERNETES_SERVICE_ACCOUNT": str(account)}
    finally:
        fake.close()


def actuator(environ: dict[str, str], deployment: str = "dreamseed-code") -> KubernetesDeployment:
    return KubernetesDeployment(KubernetesActuator(deployment=deployment), environ)


def test_start_and_stop_scale_the_deployment_through_its_scale_subresource(
        cluster: tuple[FakeKubernetes, dict[str, str]]) -> None:
    fake, environ = cluster

    async def scenario() -> list[bool | None]:
        deployment = actuator(environ)
        seen = [await deployment.running()]
        await deployment.start()
        seen.append(await deployment.running())
        await deployment.start()  # already at 1: nothing to patch
        await deployment.stop()
        seen.append(await deployment.running())
        await deployment.aclose()
        return seen

    assert asyncio.run(scenario()) == [False, True, False]
    assert fake.replicas("dreamseed-code") == 0
    assert fake.calls == [("get", "deployments/scale", "dreamseed-code"), ("get", "deployments/scale", "dreamseed-code"),
                          ("patch", "deployments/scale", "dreamseed-code"), ("get", "deployments/scale", "dreamseed-code"),
                          ("get", "deployments/scale", "dreamseed-code"), ("get", "deployments/scale", "dreamseed-code"),
                          ("patch", "deployments/scale", "dreamseed-code"), ("get", "deployments/scale", "dreamseed-code")]


def test_a_conflict_is_read_again_and_retried(cluster: tuple[FakeKubernetes, dict[str, str]]) -> None:
    fake, environ = cluster
    fake.interfere = 2  # two writes by someone else land between our read and our patch

    async def scenario() -> None:
        deployment = actuator(environ)
        await deployment.start()
        await deployment.aclose()

    asyncio.run(scenario())
    assert fake.replicas("dreamseed-code") == 1
    assert [verb for verb, _, _ in fake.calls] == ["get", "patch", "get", "patch", "get", "patch"]


def test_what_the_role_does_not_allow_is_refused_with_the_api_servers_message(
        cluster: tuple[FakeKubernetes, dict[str, str]], tmp_path: Path) -> None:
    fake, environ = cluster

    async def attempt(deployment: KubernetesDeployment) -> str:
        try:
            await deployment.start()
        except ActuatorError as exc:
            return str(exc)
        finally:
            await deployment.aclose()
        return "no error"

    refused = asyncio.run(attempt(actuator(environ, "dreamseed-general")))
    assert "Kubernetes answered 403 Forbidden" in refused
    assert 'cannot get resource "deployments/scale" in API group "apps"' in refused
    assert fake.replicas("dreamseed-general") == 1
    (Path(environ["DREAMSEED_KUBERNETES_SERVICE_ACCOUNT"]) / "token").write_text("an old token")
    assert "Kubernetes answered 401 Unauthorized" in asyncio.run(attempt(actuator(environ)))
    outside = asyncio.run(attempt(KubernetesDeployment(KubernetesActuator(deployment="dreamseed-code"), {})))
    assert "not inside a cluster" in outside


class ServiceWhileScaledUp:
    """A Service's address: connections reach the pod only while the Deployment has a replica; at 0
    there are no endpoints, and a connection is refused (closed at once)."""

    def __init__(self, target_port: int, up: Callable[[], bool]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._target, self._up = target_port, up
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self._target))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=pipe, args=(source, sink), daemon=True).start()


def test_the_proxy_starts_the_coder_by_scaling_it_and_stops_it_when_idle(
        cluster: tuple[FakeKubernetes, dict[str, str]], tmp_path: Path) -> None:
    fake, environ = cluster
    coder, general = start_sim("coder"), start_sim("general")
    service = ServiceWhileScaledUp(int(coder.url.rsplit(":", 1)[1]), lambda: fake.replicas("dreamseed-code") > 0)
    policies = write_policies(tmp_path / "p", {
        "general": {"url": general.url, "model": "general", "context_length": 4096},
        "code": {"url": service.url, "model": "coder", "context_length": 4096, "on_demand": True,
                 "health": {"interval": 0.2}}},
        {"rules": [{"name": "code", "match": {"keywords": ["코드"]}, "target": "code", "fallback": ["general"]},
                   {"name": "default", "target": "general"}]})
    (policies / "scale.yaml").write_text(yaml.safe_dump({"backends": {"code": {
        "actuator": {"kind": "kubernetes", "deployment": "dreamseed-code"},
        "cold_start": "wait", "max_wait": 20, "idle_stop": 2, "min_uptime": 0.1, "cooldown": 0.1,
        "drain_timeout": 1}}}), encoding="utf-8")
    proxy = start_proxy(policies, env=environ)
    try:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
            "model": "auto", "messages": [{"role": "user", "content": "파이썬 코드를 보여 주세요"}]})
        assert response.status_code == 200, response.text
        assert response.headers["x-dreamseed-backend"] == "code", (response.headers.get("x-dreamseed-fallback"),
                                                                   proxy.log()[-1500:])
        assert fake.replicas("dreamseed-code") == 1
        deadline = time.monotonic() + 20
        while fake.replicas("dreamseed-code") != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fake.replicas("dreamseed-code") == 0, "the idle coder was not scaled back to 0"
        assert {verb for verb, _, _ in fake.calls} <= {"get", "patch"}
        assert {name for _, _, name in fake.calls} == {"dreamseed-code"}
    finally:
        proxy.stop()
        service.close()
        coder.stop()
        general.stop()
