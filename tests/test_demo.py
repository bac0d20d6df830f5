"""The README's run command: `dreamseed serve --simulate-missing` stands in for missing backends."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from dreamseed.standins.simulation import is_reachable
from support import ROOT, SEED_POLICIES, free_port, seed_catalog, start_proxy, start_sim, write_policies, write_rag


def test_serve_simulates_every_unreachable_backend_and_says_so(tmp_path: Path) -> None:
    catalog = seed_catalog()
    real = start_sim("mistralai/Mistral-7B-Instruct-v0.3")  # one backend is really there
    try:
        catalog["backends"]["general"]["url"] = real.url
        for name in ("code", "fast"):  # nothing listens on these ports
            catalog["backends"][name]["url"] = f"http://127.0.0.1:{free_port()}"
        policies = write_policies(tmp_path / "policies", catalog["backends"], hosts=catalog["hosts"])
        write_rag(policies, yaml.safe_load((SEED_POLICIES / "rag.yaml").read_text(encoding="utf-8")))
        # The seed's scale.yaml drives the coder through Docker, which this machine lacks: serve gives it a
        # command actuator that starts a simulated coder, so the scaler really starts and stops it.
        (policies / "scale.yaml").write_text((SEED_POLICIES / "scale.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        # general70 has no URL in the environment: it is simulated on a free local port. RAG runs on
        # the embedded PostgreSQL in the state directory, as it does for the README's command.
        proxy = start_proxy(policies, env={"DREAMSEED_GENERAL70_URL": "", "DREAMSEED_STATE_DIR": str(tmp_path / "state"),
                                           "DREAMSEED_ADMIN_KEY": "demo-admin"},
                            extra=["--simulate-missing"])
        admin = {"authorization": "Bearer demo-admin"}
        try:
            announced = "".join(proxy.lines)
            assert "SIMULATED backend 'general'" not in announced
            for name in ("fast", "general70"):
                assert f"SIMULATED backend '{name}'" in announced
            assert re.search(r"SIMULATED backend 'code' .* on demand", announced), announced
            code_url = re.findall(r"SIMULATED backend 'code' \(.*?\) at (\S+)", announced)[0]
            assert not is_reachable(code_url)  # not started up front
            # The first coding prompt starts the coder (seed: cold_start fallback, so general answers it).
            first = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                               json={"model": "auto", "messages": [{"role": "user", "content": "함수를 짜줘"}]})
            assert first.status_code == 200 and first.headers["x-dreamseed-backend"] == "general"
            assert first.headers["x-dreamseed-fallback"] == "code:starting"
            deadline = time.monotonic() + 30
            backends = f"{proxy.url}/admin/backends"
            while httpx.get(backends, headers=admin).json()["backends"]["code"]["scaler"]["state"] != "ready":
                assert time.monotonic() < deadline, "the on-demand coder did not start"
                time.sleep(0.2)
            # The seed's rag.yaml retrieves for the default rule only (nothing ingested yet: no hits).
            expectations = {"함수를 짜줘": ("code", "off"), "빠른 답": ("fast", "off"), "x" * 2001: ("general70", "off"),
                            "hello": ("general", "hits=0")}
            for prompt, (backend, rag) in expectations.items():
                response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                                      json={"model": "auto", "messages": [{"role": "user", "content": prompt}]})
                assert response.status_code == 200, response.text
                assert response.headers["x-dreamseed-backend"] == backend
                assert response.headers["x-dreamseed-rag"] == rag
                assert "x-dreamseed-fallback" not in response.headers
            assert real.stats()["finished"] == 2
            assert httpx.get(f"{proxy.url}/readyz").json()["ready"] is True
            # An operator's stop works (there is no Docker engine here to fail it).
            assert httpx.post(f"{proxy.url}/admin/backends/code/stop", headers=admin).status_code == 202
            deadline = time.monotonic() + 30
            while is_reachable(code_url):
                assert time.monotonic() < deadline, "the on-demand coder did not stop"
                time.sleep(0.2)
        finally:
            proxy.stop()
        # Stopping the proxy (SIGTERM) stops the simulators it started: none is left listening.
        simulated_urls = re.findall(r"SIMULATED backend '\w+' \(.*?\) at (\S+)", announced)
        assert len(simulated_urls) == 3
        assert not any(is_reachable(url) for url in simulated_urls)
    finally:
        real.stop()


def test_serve_local_model_answers_with_a_real_model_and_starts_the_coder_on_demand(tmp_path: Path) -> None:
    """`dreamseed serve --local-model`: llama-server with SmolLM2 for the missing backends, the
    on-demand coder started as one when a coding prompt arrives (the README's second command)."""
    from real_server import STATE, real_model

    real_model()  # the one-time build, before the proxy's start-up clock
    catalog = seed_catalog()
    for name in ("general", "code", "fast"):
        catalog["backends"][name]["url"] = f"http://127.0.0.1:{free_port()}"
    policies = write_policies(tmp_path / "policies", catalog["backends"], hosts=catalog["hosts"])
    (policies / "scale.yaml").write_text((SEED_POLICIES / "scale.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    scale = yaml.safe_load((policies / "scale.yaml").read_text(encoding="utf-8"))
    scale["backends"]["code"]["cold_start"] = "wait"  # so the first coding prompt is answered by the coder
    (policies / "scale.yaml").write_text(yaml.safe_dump(scale), encoding="utf-8")
    proxy = start_proxy(policies, env={"DREAMSEED_GENERAL70_URL": "", "DREAMSEED_STATE_DIR": str(STATE)},
                        extra=["--local-model"])
    try:
        announced = "".join(proxy.lines)
        for name in ("general", "fast", "general70"):
            assert f"LOCAL MODEL backend '{name}'" in announced
        code_url = re.findall(r"LOCAL MODEL backend 'code' \(.*?\) at (\S+) on demand", announced)[0]
        assert not is_reachable(code_url)
        for prompt, backend in (("hello there", "general"), ("빠른 답변 부탁해요", "fast"), ("함수를 짜줘", "code")):
            response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=90, json={
                "model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})
            assert response.status_code == 200, response.text
            assert response.headers["x-dreamseed-backend"] == backend
            body = response.json()
            # llama.cpp's own `timings` field: real tokens from the real model, under the catalog's model id.
            assert body["choices"][0]["message"]["content"] and "timings" in body
            assert body["model"] == catalog["backends"][backend]["model"]
        assert is_reachable(code_url)
    finally:
        proxy.stop()
    urls = re.findall(r"LOCAL MODEL backend '\w+' \(.*?\) at (\S+)", announced)
    assert len(urls) == 4 and not any(is_reachable(url) for url in urls)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "reuseport"])
def test_a_taken_port_is_one_clear_line_and_exit_2_with_nothing_started(tmp_path: Path, workers: str,
                                                                          reuseport: bool) -> None:
    """Taken by any listener, one with SO_REUSEPORT included (what another `serve --workers N`
    holds): with several workers each has a socket in a SO_REUSEPORT group, which that listener
    would otherwise let them join, and the two proxies would split the port's traffic."""
    catalog = seed_catalog()
    catalog["backends"]["general"]["url"] = f"http://127.0.0.1:{free_port()}"
    policies = write_policies(tmp_path / "policies", catalog["backends"], hosts=catalog["hosts"])
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port",
                                 str(port), "--simulate-missing", "--workers", workers], capture_output=True, text=True,
                                timeout=60, cwd=ROOT, env={**os.environ, "DREAMSEED_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"dreamseed: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "SIMULATED" not in result.stdout  # nothing was started
    assert not is_reachable(catalog["backends"]["general"]["url"])


def test_simulated_backends_that_die_are_reaped_and_restarted(tmp_path: Path) -> None:
    import signal

    catalog = seed_catalog()
    port = free_port()
    catalog["backends"] = {"general": {**catalog["backends"]["general"], "url": f"http://127.0.0.1:{port}"}}
    policies = write_policies(tmp_path / "policies", catalog["backends"], {"rules": [{"name": "default", "target": "general"}]},
                              hosts=catalog["hosts"])
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state")}, extra=["--simulate-missing"])
    try:
        def simulator_pid() -> int | None:
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"dreamseed.standins.simulated_vllm" in argv and str(port).encode() in argv:
                    return int(entry.name)
            return None

        pid = simulator_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while simulator_pid() in (None, pid):
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists()  # reaped, not left a zombie
        while not is_reachable(f"http://127.0.0.1:{port}"):
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                              json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        log = proxy.log()
        assert log.count("SIMULATED backend 'general' exited (status -9)") == 1 and "restarted at" in log
    finally:
        proxy.stop()


def test_the_readme_commands_use_their_own_virtual_environment_and_ci_runs_the_test_command() -> None:
    """A system Python that refuses installs (PEP 668, Debian 12) is never installed into: both set-up
    commands make `.venv` first and use its interpreter, and .ci/run runs that same test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Set up", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    for command in commands:
        steps = [step.strip() for step in command.split("&&")]
        # The test command installs the system tools the tests use first (tests/install-system-tools.sh).
        if steps[0] == "tests/install-system-tools.sh":
            steps = steps[1:]
        assert steps[0] == "python3 -m venv .venv", command
        assert all(step.startswith(".venv/bin/") for step in steps[1:]), command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in (step.strip() for step in commands[1].split("&&")):
        assert step.replace(" -m pip install ", " -m pip install --quiet --disable-pip-version-check ") in ci or step in ci
