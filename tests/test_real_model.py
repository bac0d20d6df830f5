"""The product's other capabilities against a real inference server (llama.cpp's llama-server
with SmolLM2-135M-Instruct): on-demand start and idle stop through `dreamseed stand-in` (the
command actuator `serve --local-model` uses), retrieval reaching the real model's prompt, and
the generated Prometheus configuration scraping llama-server and the proxy together."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import test_on_demand as on_demand
from dreamseed.policy import load_policies
from dreamseed.standins.simulation import is_reachable
from infra.monitoring import PANELS, RATE, alert_rules
from real_server import SMOLLM_ID, STATE, Wiretap, real_model, start_llama
from support import Sim, free_port, start_prometheus, start_proxy, start_sim, write_policies, write_rag

ADMIN_KEY = "real-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def general() -> Iterator[Sim]:
    sim = start_sim("general-model")
    yield sim
    sim.stop()


def stand_in(action: str, pidfile: Path, port: int) -> list[str]:
    command = [sys.executable, "-m", "dreamseed.cli", "stand-in", action, "--pidfile", str(pidfile)]
    if action == "start":
        command += ["--kind", "llama", "--port", str(port), "--model", SMOLLM_ID, "--context", "2048",
                    "--state", str(STATE)]
    return command


def on_demand_policies(root: Path, general_url: str, port: int, pidfile: Path, **scale: Any) -> Path:
    """test_on_demand's policies, with the coder started as a real llama-server by `dreamseed stand-in`."""
    actuator = {"kind": "command", "start": stand_in("start", pidfile, port), "stop": stand_in("stop", pidfile, port),
                "status": stand_in("status", pidfile, port), "timeout": 60}
    return on_demand.on_demand_policies(root, general_url, port, pidfile.parent, actuator=actuator, model=SMOLLM_ID,
                                        context_length=2048, **{"start_timeout": 60, **scale})


def ask(url: str, content: str, timeout: float = 90) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "auto", "max_tokens": 12, "messages": [{"role": "user", "content": content}]})


def scaler_state(url: str) -> str:
    state: str = httpx.get(f"{url}/admin/backends", headers=ADMIN).json()["backends"]["code"]["scaler"]["state"]
    return state


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_coding_prompt_starts_the_real_server_and_waits_for_it_then_idle_stops_it(tmp_path: Path, general: Sim) -> None:
    real_model()  # built before the clock below starts
    port, pidfile = free_port(), tmp_path / "code.pid"
    policies = on_demand_policies(tmp_path / "p", general.url, port, pidfile, cold_start="wait", max_wait=60, idle_stop=2)
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": ADMIN_KEY}, extra=["--log-level", "info"])
    try:
        assert scaler_state(proxy.url) == "stopped" and not is_reachable(f"http://127.0.0.1:{port}")
        response = ask(proxy.url, "이 코드 좀 봐줘: print('hi')")
        assert response.status_code == 200, response.text
        assert response.headers["x-dreamseed-backend"] == "code"
        waited = float(re.fullmatch(r"waited (\d+\.\d+)s", response.headers["x-dreamseed-cold-start"])[1])  # type: ignore[index]
        assert waited > 0  # the real server's start-up, process start to /health ok
        assert response.json()["model"] == SMOLLM_ID and response.json()["choices"][0]["message"]["content"]
        assert "timings" in response.json()  # llama.cpp's own field: the answer came from the real server
        # No requests for idle_stop (2 s): the scaler stops the real process through the actuator.
        wait_until(lambda: scaler_state(proxy.url) == "stopped", 30, "the idle stop")
        wait_until(lambda: not is_reachable(f"http://127.0.0.1:{port}"), 15, "llama-server to exit")
        assert not pidfile.exists()
    finally:
        proxy.stop()
        subprocess.run(stand_in("stop", pidfile, port), check=False)


def test_fallback_mode_answers_from_general_while_the_real_server_starts(tmp_path: Path, general: Sim) -> None:
    real_model()
    port, pidfile = free_port(), tmp_path / "code.pid"
    policies = on_demand_policies(tmp_path / "p", general.url, port, pidfile, cold_start="fallback")
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": ADMIN_KEY}, extra=["--log-level", "info"])
    try:
        first = ask(proxy.url, "write some code please")
        assert first.status_code == 200 and first.headers["x-dreamseed-backend"] == "general"
        assert first.headers["x-dreamseed-cold-start"] == "fallback"
        assert first.headers["x-dreamseed-fallback"] == "code:starting"
        wait_until(lambda: scaler_state(proxy.url) == "ready", 60, "the real server to become ready")
        second = ask(proxy.url, "write some code please")
        assert second.headers["x-dreamseed-backend"] == "code" and "timings" in second.json()
        assert "x-dreamseed-cold-start" not in second.headers
        assert httpx.post(f"{proxy.url}/admin/backends/code/stop", headers=ADMIN).status_code == 202
        wait_until(lambda: not is_reachable(f"http://127.0.0.1:{port}"), 30, "the admin stop")
    finally:
        proxy.stop()
        subprocess.run(stand_in("stop", pidfile, port), check=False)


def test_retrieved_passages_reach_the_real_models_prompt(tmp_path: Path) -> None:
    llama = start_llama()
    tap = Wiretap(int(llama.url.rsplit(":", 1)[1]))
    try:
        backends = {"general": {"url": tap.url, "model": SMOLLM_ID, "context_length": 2048}}
        policies = write_rag(write_policies(tmp_path / "p", backends, {"rules": [{"name": "default", "target": "general"}]}),
                             {"defaults": {"enabled": True, "collection": "lore", "mode": "hybrid", "top_k": 2}})
        proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state"), "DREAMSEED_ADMIN_KEY": ADMIN_KEY})
        try:
            documents = [
                {"source": "harbor.md", "text": "The Quillfeather lighthouse keeper is named Orsolya Brandt. "
                                                "She has kept the light on Kestrel Point since 1987."},
                {"source": "bakery.md", "text": "The bakery on Mill Lane sells rye bread on Tuesdays and "
                                                "cardamom buns on Saturdays."},
            ]
            ingested = httpx.post(f"{proxy.url}/admin/rag/ingest", headers=ADMIN, timeout=120,
                                  json={"collection": "lore", "documents": documents})
            assert ingested.status_code == 200, ingested.text
            answer = ask(proxy.url, "Who keeps the Quillfeather lighthouse?")
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-dreamseed-rag"].startswith("hits=")
            assert int(answer.headers["x-dreamseed-rag"].removeprefix("hits=")) >= 1
            assert "timings" in answer.json()  # the real server answered
            # The passage with the answer is in the request llama-server received (not asserting on
            # what the tiny model makes of it).
            sent = tap.sent().decode("utf-8", errors="replace")
            assert "Orsolya Brandt" in sent and "Who keeps the Quillfeather lighthouse?" in sent
        finally:
            proxy.stop()
    finally:
        tap.close()
        llama.stop()


def test_prometheus_scrapes_llama_server_and_the_proxy_and_the_engine_panels_have_data(tmp_path: Path) -> None:
    llama = start_llama()
    try:
        backends = {"general": {"url": llama.url, "model": SMOLLM_ID, "context_length": 2048}}
        proxy = start_proxy(write_policies(tmp_path / "p", backends, {"rules": [{"name": "default", "target": "general"}]}))
        server, api = start_prometheus(tmp_path, proxy.url, {"general": llama.url},
                                       alert_rules(load_policies(tmp_path / "p"), "none"))
        # The queries that apply to llama-server: the proxy's own, and the engine panels' llama.cpp legs.
        wanted = {title: [q.replace(RATE, "1m") for q, _ in queries] for title, _, queries in PANELS
                  if title in ("Request rate by backend", "Tokens per second", "Inference engine load")}
        assert len(wanted) == 3
        try:
            deadline = time.monotonic() + 60
            missing: list[str] = list(wanted)
            while missing and time.monotonic() < deadline:
                # A slow stream keeps a request running in the engine while Prometheus scrapes. (The
                # proxy counts tokens from usage reports: a stream has one when the client asks for it.)
                with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
                        "model": "auto", "stream": True, "max_tokens": 60, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}) as response:
                    for _ in response.iter_lines():
                        pass
                missing = [title for title, queries in wanted.items() if not all(_has_data(api, q) for q in queries)]
                time.sleep(0.5)
            assert not missing, f"no data for {missing}: " + (tmp_path / "prometheus.log").read_text()[-2000:]
            targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
            assert {t["labels"]["job"]: t["health"] for t in targets} == {"dreamseed-proxy": "up", "vllm": "up"}
            running = httpx.get(f"{api}/query", params={"query": "llamacpp:tokens_predicted_total"}).json()
            assert running["data"]["result"][0]["metric"]["backend"] == "general"
        finally:
            server.terminate()
            server.wait(timeout=10)
            proxy.stop()
    finally:
        llama.stop()


def _has_data(api: str, query: str) -> bool:
    try:
        result = httpx.get(f"{api}/query", params={"query": query}).json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False
    return bool(result)
