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

Ready means the backend's `/health` and `/v1/models` both answer 200: vLLM answers /health
while it still loads weights on some versions, /v1/models only once it can serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Protocol

import httpx

from ..policy import CommandActuator, DockerActuator

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


def make_actuator(spec: DockerActuator | CommandActuator) -> Actuator:
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
