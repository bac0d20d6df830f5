"""The simulated vLLM server keeps its promises (tests elsewhere rely on them)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from support import Sim, start_sim


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    process = start_sim("sim/model-1", tokens=5, api_key="k")
    yield process
    process.stop()


@pytest.fixture
def client(sim: Sim) -> Iterator[httpx.Client]:
    sim.reset()
    with httpx.Client(base_url=sim.url, headers={"authorization": "Bearer k"}, timeout=10) as c:
        yield c
    sim.reset()


def body(**extra: object) -> dict[str, object]:
    return {"model": "sim/model-1", "messages": [{"role": "user", "content": "hello"}], **extra}


def test_openai_endpoints(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "sim/model-1"
    answer = client.post("/v1/chat/completions", json=body()).json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 5
    text = client.post("/v1/completions", json={"model": "sim/model-1", "prompt": "x"}).json()
    assert text["object"] == "text_completion"
    wrong = client.post("/v1/chat/completions", json={**body(), "model": "other"})
    assert wrong.status_code == 404


def test_api_key_is_required_like_vllm(sim: Sim) -> None:
    assert httpx.post(f"{sim.url}/v1/chat/completions", json=body()).status_code == 401
    assert httpx.get(f"{sim.url}/health").status_code == 200  # health stays open, as in vLLM


def test_streaming_timing_knobs(client: httpx.Client, sim: Sim) -> None:
    sim.configure(ttft=0.3, token_delay=0.1, tokens=3)
    started = time.monotonic()
    arrivals = []
    with client.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    # Lower bounds only, with a margin: the event loop may wake a millisecond early, and a
    # busy machine only ever makes things later.
    assert arrivals[0] >= 0.25  # the role-only chunk comes with the first token, as vLLM sends it
    assert arrivals[3] - arrivals[1] >= 0.15  # first token to third
    assert len(arrivals) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]


def test_ttft_jitter_spreads_the_answer_times_within_its_range(client: httpx.Client, sim: Sim) -> None:
    sim.configure(ttft=0.1, ttft_jitter=0.5, tokens=1)
    took = []
    for _ in range(12):
        started = time.monotonic()
        assert client.post("/v1/chat/completions", json=body()).status_code == 200
        took.append(time.monotonic() - started)
    assert min(took) >= 0.045  # 0.1 s less half, with the event loop's margin
    assert max(took) - min(took) > 0.02  # spread, not exact (12 uniform draws over 0.05-0.15 s)


def test_error_rate_and_status(client: httpx.Client, sim: Sim) -> None:
    sim.configure(error_rate=1.0, error_status=503)
    response = client.post("/v1/chat/completions", json=body())
    assert response.status_code == 503 and response.json()["error"]["message"] == "simulated failure"
    assert sim.stats()["errors"] == 1


def test_hang_until_the_client_gives_up(client: httpx.Client, sim: Sim) -> None:
    sim.configure(hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=body(), timeout=0.5)
    assert sim.wait_for(lambda s: s["cancelled"] == 1)["cancelled"] == 1


def test_crash_mid_stream_breaks_the_connection(client: httpx.Client, sim: Sim) -> None:
    sim.configure(crash_after=2)
    lines = []
    with pytest.raises(httpx.RemoteProtocolError):
        with client.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
            for line in response.iter_lines():
                lines.append(line)
    assert len([line for line in lines if line.startswith("data: ")]) == 3  # the role, then two tokens
    assert sim.stats()["crashed"] == 1


def test_slow_start_is_not_ready_then_ready(client: httpx.Client, sim: Sim) -> None:
    sim.configure(slow_start=0.5)
    assert client.get("/health").status_code == 503
    assert client.post("/v1/chat/completions", json=body()).status_code == 503
    time.sleep(0.6)
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=body()).status_code == 200


def test_metrics_use_vllm_names(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=body())
    metrics = client.get("/metrics").text
    assert 'vllm:num_requests_running{model_name="sim/model-1",engine="0"} 0' in metrics
    assert 'vllm:generation_tokens_total{model_name="sim/model-1",engine="0"} 5' in metrics
    assert "# TYPE vllm:request_success_total counter" in metrics


def test_unknown_knob_is_refused(sim: Sim) -> None:
    response = httpx.post(f"{sim.url}/sim/config", json={"tffs": 1})
    assert response.status_code == 400 and "tffs" in response.json()["error"]["message"]
