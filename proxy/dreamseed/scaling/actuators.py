"""How an on-demand backend is started and stopped, and how we know it is ready.

`docker`: the Docker Engine API on its unix socket (httpx's UDS transport), or where `DOCKER_HOST`
points (Docker's own convention: `tcp://host:port`, `unix:///path`; the local stack points it at a
socket proxy that allows only these calls on the declared containers), on a container that
`infra/` declared and left stopped. Calls, as Docker documents them:
    POST /v{api}/containers/{name}/start          204 started, 304 already running
    POST /v{api}/containers/{name}/stop?t=GRACE   204 stopped, 304 already stopped
    GET  /v{api}/containers/{name}/json           State.Running
`command`: start/stop/status as argument lists run without a shell (nothing in them is
interpreted, so no injection path), each bounded by a timeout.
`kubernetes`: the Deployment's `scale` subresource (autoscaling/v1 Scale), as the proxy's service
account, from inside the cluster (the API server from KUBERNETES_SERVICE_HOST/PORT, the token, CA
and namespace from /var/run/secrets/kubernetes.io/serviceaccount, the token read again for every
call because kubelet rotates it). Calls, as the Kubernetes API documents them:
    GET   /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale   200 Scale (spec.replicas, resourceVersion)
    PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale   application/merge-patch+json with
          the resourceVersion read: 200, or 409 Conflict when the object changed since (read again, retry)
A refusal (401, 403 from RBAC, 404) is an ActuatorError carrying the API's own Status message.

Ready means the backend's `/health` and `/v1/models` both answer 200: vLLM answers /health
while it still loads weights on some versions, /v1/models only once it can serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from typing import Protocol

import httpx

from ..policy import CommandActuator, DockerActuator, KubernetesActuator

log = logging.getLogger("dreamseed.scaling")


class ActuatorError(Exception):
    pass


class Actuator(Protocol):
    description: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def running(self) -> bool | None:
        """Whether the backend's process/container runs; None when the actuator cannot tell."""
        ...

    async def aclose(self) -> None: ...


def docker_endpoint(spec: DockerActuator, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(base URL, unix socket or None) of the Docker Engine API: `DOCKER_HOST` when set, else the
    actuator's socket."""
    host = environ.get("DOCKER_HOST", "")
    if host.startswith("tcp://"):
        return f"http://{host.removeprefix('tcp://').rstrip('/')}/v{spec.api_version}", None
    if host and not host.startswith("unix://"):
        raise ActuatorError(f"DOCKER_HOST={host!r}: only tcp://host:port and unix:///path are supported")
    return f"http://docker/v{spec.api_version}", host.removeprefix("unix://") or spec.socket


class DockerEngine:
    def __init__(self, spec: DockerActuator, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.spec = spec
        self.description = f"docker container {spec.container}"
        base_url, socket = docker_endpoint(spec)
        self.where = socket or base_url
        self._client = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=socket),
            base_url=base_url, timeout=httpx.Timeout(10.0, read=spec.stop_grace + 30.0))

    async def _call(self, method: str, path: str, ok: tuple[int, ...], **params: str | int) -> httpx.Response:
        try:
            response = await self._client.request(method, path, params=params or None)
        except httpx.HTTPError as exc:
            raise ActuatorError(f"Docker Engine API at {self.where} unreachable: {exc}") from exc
        if response.status_code not in ok:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ActuatorError(f"{method} {path}: Docker answered {response.status_code}: {message}")
        return response

    async def start(self) -> None:
        await self._call("POST", f"/containers/{self.spec.container}/start", (204, 304))

    async def stop(self) -> None:
        await self._call("POST", f"/containers/{self.spec.container}/stop", (204, 304), t=self.spec.stop_grace)

    async def running(self) -> bool | None:
        response = await self._call("GET", f"/containers/{self.spec.container}/json", (200,))
        return bool(response.json().get("State", {}).get("Running"))

    async def aclose(self) -> None:
        await self._client.aclose()


class Commands:
    def __init__(self, spec: CommandActuator) -> None:
        self.spec = spec
        self.description = f"command {spec.start[0]}"

    async def _run(self, argv: list[str], *, check: bool = True) -> int:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise ActuatorError(f"cannot run {argv[0]!r}: {exc}") from exc
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self.spec.timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ActuatorError(f"{argv[0]!r} did not finish within {self.spec.timeout:g} s") from None
        if process.returncode != 0 and check:
            tail = output.decode(errors="replace").strip()[-500:]
            raise ActuatorError(f"{' '.join(argv)!r} exited with {process.returncode}: {tail}")
        return process.returncode or 0

    async def start(self) -> None:
        await self._run(self.spec.start)

    async def stop(self) -> None:
        await self._run(self.spec.stop)

    async def running(self) -> bool | None:
        if self.spec.status is None:
            return None
        return await self._run(self.spec.status, check=False) == 0

    async def aclose(self) -> None:
        pass


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # where kubelet mounts a pod's credentials
CONFLICT_RETRIES = 5


class KubernetesDeployment:
    def __init__(self, spec: KubernetesActuator, environ: Mapping[str, str] = os.environ,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.spec = spec
        # DREAMSEED_KUBERNETES_API and _SERVICE_ACCOUNT point elsewhere than in-cluster (tests, kubectl proxy).
        self._account = environ.get("DREAMSEED_KUBERNETES_SERVICE_ACCOUNT", SERVICE_ACCOUNT)
        # Where it cannot work (outside a cluster, say) it fails its calls, not the proxy's start.
        self._problem: str | None = None
        api = environ.get("DREAMSEED_KUBERNETES_API")
        if api is None:
            host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                self._problem = "kubernetes actuator: not inside a cluster (no KUBERNETES_SERVICE_HOST)"
            api = f"https://{host or 'kubernetes.default.svc'}:{port}"
        namespace = spec.namespace
        if namespace is None:
            try:
                namespace = self._read("namespace").strip()
            except ActuatorError as exc:
                self._problem, namespace = self._problem or str(exc), "default"
        self.path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{spec.deployment}/scale"
        self.description = f"kubernetes deployment {namespace}/{spec.deployment}"
        ca = os.path.join(self._account, "ca.crt")
        verify: str | bool = ca if api.startswith("https:") and os.path.exists(ca) else True
        self._client = httpx.AsyncClient(base_url=api, transport=transport, verify=verify, timeout=10.0,
                                         trust_env=False)

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self._account, name), encoding="utf-8") as file:
                return file.read()
        except OSError as exc:
            raise ActuatorError(f"kubernetes actuator: cannot read the service account's {name}: {exc}") from exc

    async def _call(self, method: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
        if self._problem is not None:
            raise ActuatorError(self._problem)
        headers = {"authorization": f"Bearer {self._read('token').strip()}", "accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/merge-patch+json"
        try:
            response = await self._client.request(method, self.path, headers=headers,
                                                  content=None if body is None else json.dumps(body).encode())
        except httpx.HTTPError as exc:
            raise ActuatorError(f"Kubernetes API at {self._client.base_url} unreachable: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = {"message": response.text[:300]}
        if response.status_code not in (200, 409):
            raise ActuatorError(f"{method} {self.path}: Kubernetes answered {response.status_code} "
                                f"{data.get('reason', '')}: {data.get('message', '')}".rstrip(": "))
        return response.status_code, data

    async def _scale(self) -> tuple[int, str | None]:
        """The Scale's spec.replicas and resourceVersion."""
        _, scale = await self._call("GET")
        spec, metadata = scale.get("spec"), scale.get("metadata")
        replicas = int(spec.get("replicas", 0) or 0) if isinstance(spec, dict) else 0
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        return replicas, version if isinstance(version, str) else None

    async def _set(self, replicas: int) -> None:
        for _ in range(CONFLICT_RETRIES):
            current, version = await self._scale()
            if current == replicas:
                return
            status, _ = await self._call("PATCH", {"metadata": {"resourceVersion": version},
                                                   "spec": {"replicas": replicas}})
            if status == 200:
                return
            log.info("%s changed while being scaled (409 Conflict): reading it again", self.description)
        raise ActuatorError(f"{self.description}: still changing under us after {CONFLICT_RETRIES} tries (409 Conflict)")

    async def start(self) -> None:
        await self._set(self.spec.replicas)

    async def stop(self) -> None:
        await self._set(0)

    async def running(self) -> bool | None:
        replicas, _ = await self._scale()
        return replicas > 0

    async def aclose(self) -> None:
        await self._client.aclose()


def make_actuator(spec: DockerActuator | CommandActuator | KubernetesActuator) -> Actuator:
    if isinstance(spec, KubernetesActuator):
        return KubernetesDeployment(spec)
    return DockerEngine(spec) if isinstance(spec, DockerActuator) else Commands(spec)


async def is_ready(client: httpx.AsyncClient, timeout: float = 2.0) -> bool:
    """The backend answers both /health and /v1/models with 200."""
    try:
        health = await client.get("/health", timeout=timeout)
        if health.status_code != 200:
            return False
        models = await client.get("/v1/models", timeout=timeout)
        return models.status_code == 200
    except httpx.HTTPError:
        return False
