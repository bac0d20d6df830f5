"""The same client-visible checks against the simulator and against a real server (llama.cpp).

Each test runs twice through one proxy process: once addressed to `sim` (our simulated vLLM) and
once to `real` (llama-server with SmolLM2-135M-Instruct, which nobody here wrote). Where the two
disagreed, the simulator was changed to answer as real servers do (see simulated_vllm.py).
A `Wiretap` between the proxy and each server records what the proxy really sent.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from dreamseed.standins.local_model import LlamaServer
from real_server import SMOLLM_ID, Wiretap, start_llama
from support import Process, Sim, start_proxy, start_sim, write_policies

CONTEXT = 2048  # tokens per request, on both servers and in the catalog


@dataclass
class Target:
    name: str  # the backend name a client asks for
    model: str  # the model id the server answers with
    proxy: Process
    tap: Wiretap
    llama: LlamaServer | None = None
    sim: Sim | None = None

    @property
    def base_url(self) -> str:
        return f"{self.proxy.url}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=60)

    def idle(self) -> bool:
        """The server generates nothing now."""
        if self.llama is not None:
            return not any(slot["is_processing"] for slot in httpx.get(f"{self.llama.url}/slots").json())
        assert self.sim is not None
        return self.sim.stats()["active"] == 0


@dataclass
class Servers:
    proxy: Process
    targets: dict[str, Target]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    llama = start_llama(SMOLLM_ID, context=CONTEXT)
    sim = start_sim("simulated-smollm", max_model_len=CONTEXT, tokens=40)
    taps = {"real": Wiretap(int(llama.url.rsplit(":", 1)[1])), "sim": Wiretap(int(sim.url.rsplit(":", 1)[1]))}
    try:
        backends = {
            "real": {"url": taps["real"].url, "model": SMOLLM_ID, "context_length": CONTEXT},
            "sim": {"url": taps["sim"].url, "model": "simulated-smollm", "context_length": CONTEXT},
        }
        routing = {"rules": [{"name": "default", "target": "real"}]}
        proxy = start_proxy(write_policies(tmp_path_factory.mktemp("conformance"), backends, routing))
    except BaseException:
        llama.stop()
        sim.stop()
        raise
    targets = {"real": Target("real", SMOLLM_ID, proxy, taps["real"], llama=llama),
               "sim": Target("sim", "simulated-smollm", proxy, taps["sim"], sim=sim)}
    yield Servers(proxy, targets)
    proxy.stop()
    llama.stop()
    sim.stop()
    for tap in taps.values():
        tap.close()


@pytest.fixture(params=["sim", "real"])
def target(request: pytest.FixtureRequest, servers: Servers) -> Target:
    found: Target = servers.targets[request.param]
    found.tap.clear()
    return found


HELLO = [{"role": "user", "content": "Say hello to Ada in one short sentence."}]


def test_chat_completion_parses_with_the_official_sdk(target: Target) -> None:
    answer = target.client().chat.completions.create(model=target.name, messages=HELLO, max_tokens=24)  # type: ignore[arg-type]
    assert answer.object == "chat.completion" and answer.model == target.model
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_parses_and_counts_usage_when_asked(target: Target) -> None:
    stream = target.client().chat.completions.create(
        model=target.name, messages=HELLO, max_tokens=24, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["stop"], ["length"])
    # The usage chunk comes last, with no choices (OpenAI's contract for include_usage).
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 24
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_without_include_usage_has_no_usage_chunk(target: Target) -> None:
    chunks = list(target.client().chat.completions.create(model=target.name, messages=HELLO, max_tokens=8, stream=True))  # type: ignore[arg-type]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_text_completion_streamed_and_not(target: Target) -> None:
    client = target.client()
    whole = client.completions.create(model=target.name, prompt="The capital of France is", max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
    parts = list(client.completions.create(model=target.name, prompt="The capital of France is", max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices)
    assert [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason] in (["stop"], ["length"])


def test_max_tokens_is_honoured(target: Target) -> None:
    answer = target.client().chat.completions.create(
        model=target.name, messages=[{"role": "user", "content": "Write a long story about the sea."}], max_tokens=5)
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"


def test_stop_sequences_end_the_answer_before_them(target: Target) -> None:
    client = target.client()
    free = client.completions.create(model=target.name, prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0)
    # The stop string: a word the unconstrained answer really produces, so stopping is observable.
    words = re.findall(r"\w+", free.choices[0].text)
    assert len(words) >= 3, free.choices[0].text
    stop = words[2]
    stopped = client.completions.create(model=target.name, prompt="1, 2, 3, 4, 5,", max_tokens=24, temperature=0,
                                        stop=[stop])
    text = stopped.choices[0].text
    assert stop not in text and stopped.choices[0].finish_reason == "stop"
    assert free.choices[0].text.startswith(text)


def test_several_choices_and_logprobs_as_asked(target: Target) -> None:
    answer = target.client().chat.completions.create(model=target.name, messages=HELLO, max_tokens=4, n=2,
                                                     logprobs=True, top_logprobs=2)  # type: ignore[arg-type]
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)


def test_korean_streams_as_whole_utf8_characters(target: Target) -> None:
    """Raw bytes through the proxy: every SSE event is complete JSON in valid UTF-8, and the text
    streamed is the text the server gives unstreamed (no character split or replaced).

    One real difference: when max_tokens ends the answer inside a character, llama-server's
    unstreamed text ends in U+FFFD, while its stream holds the incomplete character back."""
    body = {"model": target.name, "prompt": "서울은 대한민국의 수도이다. 서울의", "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{target.base_url}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    raw = b""
    with httpx.stream("POST", f"{target.base_url}/completions", json={**body, "stream": True}, timeout=60) as response:
        for part in response.iter_raw():
            raw += part
    events = [e for e in raw.decode("utf-8", errors="strict").split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    streamed = "".join(p["choices"][0]["text"] for p in pieces if p["choices"])
    assert "\ufffd" not in streamed
    assert whole.startswith(streamed) and not whole[len(streamed):].strip(" \ufffd"), (whole, streamed)
    if target.name == "real":
        assert re.search("[가-힣]", streamed), streamed  # the model really answered in Hangul


def test_over_long_prompt_gets_the_servers_4xx_in_openai_shape(target: Target) -> None:
    prompt = "word " * (CONTEXT * 2)
    response = httpx.post(f"{target.base_url}/chat/completions", timeout=60,
                          json={"model": target.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and "context" in error["message"]
    # OpenAI's shape whichever server answered (llama.cpp: a number code and a type of its own).
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert error["code"] is None or isinstance(error["code"], str)
    assert response.headers["x-dreamseed-backend"] == target.name
    assert "x-dreamseed-fallback" not in response.headers
    with pytest.raises(openai.BadRequestError):
        target.client().chat.completions.create(model=target.name, messages=[{"role": "user", "content": prompt}])


def test_client_disconnect_mid_stream_stops_generation(target: Target) -> None:
    if target.sim is not None:
        target.sim.configure(token_delay=0.05, tokens=2000)
    try:
        with httpx.stream("POST", f"{target.base_url}/chat/completions", timeout=60, json={
                "model": target.name, "stream": True, "max_tokens": 2000, "temperature": 1,
                "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]}) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            assert not target.idle()  # it is generating
        deadline = time.monotonic() + 10
        while not target.idle():
            assert time.monotonic() < deadline, "the server kept generating after the client went away"
            time.sleep(0.05)
        if target.llama is not None:
            metrics = httpx.get(f"{target.llama.url}/metrics").text
            predicted = float(re.search(r"^llamacpp:tokens_predicted_total (\S+)", metrics, re.M)[1])  # type: ignore[index]
            assert predicted < 1000  # all requests so far together: far from this one's 2,000
        else:
            assert target.sim is not None and target.sim.stats()["cancelled"] >= 1
    finally:
        if target.sim is not None:
            target.sim.reset()


def test_request_id_reaches_the_server(target: Target) -> None:
    rid = uuid.uuid4().hex
    response = httpx.post(f"{target.base_url}/chat/completions", headers={"x-request-id": rid}, timeout=60,
                          json={"model": target.name, "messages": HELLO, "max_tokens": 4})
    assert response.status_code == 200 and response.headers["x-request-id"] == rid
    assert f"x-request-id: {rid}".encode() in target.tap.sent().lower()


def test_model_list_and_health_pass_through(target: Target) -> None:
    models = {m.id for m in target.client().models.list()}
    assert {"auto", "real", "sim"} <= models


def test_a_server_that_dies_at_start_fails_loudly(tmp_path: Path) -> None:
    """A llama-server that cannot run (here: a model file that is not GGUF) ends the start at
    once with its exit status and log, instead of a hang until the timeout."""
    from dataclasses import replace

    from real_server import real_model

    broken = tmp_path / "not-a-model.gguf"
    broken.write_bytes(b"not a gguf file")
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        LlamaServer.start(replace(real_model(), model=broken), "broken", timeout=60)
    assert time.monotonic() - started < 30
    assert "exited with" in str(failure.value) and "log" in str(failure.value)
