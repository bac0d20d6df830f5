"""The Docker gate: the proxy's real docker actuator works through it, and nothing else passes.

A fake Docker Engine (support.FakeDockerEngine) listens on a unix socket, as dockerd does, and
records what reaches it. The
gate's allowlist is the one the local stack deploys (`gate_command`). Where the real
wollomatic/socket-proxy binary is available (DREAMSEED_SOCKET_PROXY, or `socket-proxy` on PATH:
built from its Go sources, which have no dependencies), the requests go through it on real
sockets; the allowlist's patterns are also checked against the paths the actuator really sends,
with socket-proxy's documented rule (the pattern anchored at both ends, per method), everywhere."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pulumi
import pytest

from dreamseed.policy import DockerActuator
from dreamseed.scaling.actuators import DockerEngine
from infra.components.docker_gate import allowlist, gate_command
from support import FakeDockerEngine, free_port

CONTAINERS = ["dreamseed-code"]
SOCKET_PROXY = os.environ.get("DREAMSEED_SOCKET_PROXY") or shutil.which("socket-proxy")

# What the scaler must never be able to do through the gate.
FORBIDDEN = [
    ("GET", "/v1.43/containers/json"),  # list every container
    ("POST", "/v1.43/containers/create"),  # run anything, mount anything: root on the host
    ("POST", "/v1.43/containers/dreamseed-code/exec"),
    ("POST", "/v1.43/containers/dreamseed-general/stop"),  # a container that is not on demand
    ("POST", "/v1.43/containers/dreamseed-codeX/start"),  # the pattern is anchored
    ("GET", "/v1.43/containers/dreamseed-code/json/../../../images/json"),
    ("DELETE", "/v1.43/containers/dreamseed-code"),
    ("GET", "/v1.43/images/json"),
]


@pytest.fixture
def docker_engine(tmp_path: Path) -> Iterator[tuple[str, FakeDockerEngine]]:
    path = str(tmp_path / "docker.sock")
    engine = FakeDockerEngine(path, "dreamseed-code")
    yield path, engine
    engine.stop()


def drive_the_actuator() -> list[bool | None]:
    """Start, inspect, stop, inspect: what the scaler does with an on-demand backend."""
    async def go() -> list[bool | None]:
        engine = DockerEngine(DockerActuator(container="dreamseed-code"))
        try:
            await engine.start()
            up = await engine.running()
            await engine.stop()
            return [up, await engine.running()]
        finally:
            await engine.aclose()
    return asyncio.run(go())


def test_the_allowlist_admits_exactly_the_actuators_calls(docker_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    path, engine = docker_engine
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    assert drive_the_actuator() == [True, False]
    sent = {(method, target.split("?", 1)[0]) for method, target in engine.seen}
    assert sent == {("POST", "/v1.43/containers/dreamseed-code/start"), ("POST", "/v1.43/containers/dreamseed-code/stop"),
                    ("GET", "/v1.43/containers/dreamseed-code/json")}
    rules = allowlist(CONTAINERS)
    # socket-proxy: the method must be listed, and the path match its pattern with ^ and $ added.
    for method, target in sent:
        assert re.fullmatch(rules[method], target), (method, target)
    for method, target in FORBIDDEN:
        assert method not in rules or not re.fullmatch(rules[method], target), (method, target)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(SOCKET_PROXY is None, reason="the socket-proxy binary is not here: build wollomatic/socket-proxy "
                    "from its Go sources (`go build ./cmd/socket-proxy`) and set DREAMSEED_SOCKET_PROXY to it")
def test_through_the_real_socket_proxy_the_actuator_works_and_anything_else_is_refused(
        docker_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    path, engine = docker_engine
    port = free_port()
    flags = [f for f in gate_command(CONTAINERS, allow_from="127.0.0.1/32")
             if not f.startswith(("-listenip", "-proxyport"))]
    gate = subprocess.Popen([str(SOCKET_PROXY), f"-socketpath={path}", "-listenip=127.0.0.1", f"-proxyport={port}",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            assert time.monotonic() < deadline and gate.poll() is None, "socket-proxy did not start"
            time.sleep(0.05)
        monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
        assert drive_the_actuator() == [True, False]  # the proxy's own actuator, through the gate
        reached = len(engine.seen)
        assert reached == 4
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for method, target in FORBIDDEN:
                status = client.request(method, target).status_code
                assert status in (403, 405), (method, target, status)
        assert len(engine.seen) == reached  # none of those reached Docker
    finally:
        gate.terminate()
        gate.wait(timeout=10)


# --- the gate's user and the socket's group ------------------------------------------------------

DOCKER_GID = 4242  # the docker group's number on this pretend host (it differs from host to host)
INSPECT = b"GET /v1.43/containers/dreamseed-code/json HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to own a socket as root:docker and run processes "
                             "as the gate's user (CI runs as root)")


@pytest.fixture
def docker_socket() -> Iterator[tuple[str, FakeDockerEngine]]:
    """A Docker socket as Docker's packages make it: root:docker, mode 0660, in a folder anyone may enter."""
    folder = tempfile.mkdtemp(prefix="dreamseed-docker-")
    os.chmod(folder, 0o755)
    path = f"{folder}/docker.sock"
    engine = FakeDockerEngine(path, "dreamseed-code")
    os.chown(path, 0, DOCKER_GID)
    os.chmod(path, 0o660)
    yield path, engine
    engine.stop()
    shutil.rmtree(folder, ignore_errors=True)


def as_user(user: str) -> dict[str, object]:
    """subprocess's arguments that run a child as a container's `user: "uid:gid"` runs its process."""
    uid, gid = (int(part) for part in user.split(":"))
    return {"user": uid, "group": gid, "extra_groups": []}


def inspect_as(user: str, path: str) -> str:
    """The status line Docker's socket answers a process running as `user` (forked, so no program file
    needs to be readable by that user), or the error its connect raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, then talk to the socket
        try:
            uid, gid = (int(part) for part in user.split(":"))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as connection:
                connection.connect(path)
                connection.sendall(INSPECT)
                answer = connection.recv(100).decode().splitlines()[0]
        except OSError as exc:
            answer = f"{type(exc).__name__}: {exc}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        return pipe.read()


@AS_ROOT
def test_the_gate_runs_in_the_sockets_group_so_it_can_open_the_socket(docker_socket, run_stack) -> None:
    path, engine = docker_socket
    # The stack reads the socket's group itself when the Docker host is this machine.
    mocks, _ = run_stack("local", {"dreamseed:dockerHost": f"unix://{path}", "dreamseed:dockerSocketGid": None})
    (gate,) = [r.inputs for r in mocks.of_type("docker:index/container:Container") if r.inputs["name"] == "dreamseed-docker-gate"]
    assert gate["user"] == f"65534:{DOCKER_GID}"
    assert inspect_as(gate["user"], path).startswith("HTTP/1.0 200")
    # The image's own user, 65534:65534, is refused by the socket's mode: what the gate met before.
    assert inspect_as("65534:65534", path).startswith("PermissionError")
    if SOCKET_PROXY is not None:
        port = free_port()
        flags = [f for f in gate_command(CONTAINERS, allow_from="127.0.0.1/32") if not f.startswith(("-listenip", "-proxyport"))]
        command = [str(SOCKET_PROXY), f"-socketpath={path}", "-listenip=127.0.0.1", f"-proxyport={port}", *flags]
        for user, works in ((gate["user"], True), ("65534:65534", False)):
            gate_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            **as_user(user))  # type: ignore[call-overload]
            try:
                deadline = time.monotonic() + 10
                while not listening(port) and gate_process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if works:
                    assert httpx.get(f"http://127.0.0.1:{port}/v1.43/containers/dreamseed-code/json").status_code == 200
                else:  # its start-up check cannot reach Docker: it exits instead of serving
                    assert gate_process.wait(timeout=10) != 0
            finally:
                gate_process.kill()
                gate_process.wait(timeout=10)
    assert engine.seen


def test_a_remote_docker_host_must_name_the_sockets_group(run_stack) -> None:
    with pytest.raises(pulumi.RunError, match=r"set dreamseed:dockerSocketGid .*stat -c %g /var/run/docker.sock"):
        run_stack("local", {"dreamseed:dockerHost": "ssh://admin@gpu-box", "dreamseed:dockerSocketGid": None})
