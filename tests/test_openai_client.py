"""The official `openai` SDK against the running proxy: what application developers do."""

from __future__ import annotations

import openai
import pytest

from conftest import Stack


@pytest.fixture
def client(fresh: Stack) -> openai.OpenAI:
    # No retries: a retried error would hide what the proxy answered the first time.
    return openai.OpenAI(base_url=f"{fresh.url}/v1", api_key="unused-for-now", max_retries=0, timeout=30)


def test_chat_completion(client: openai.OpenAI, fresh: Stack) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is the capital of Korea?"}]
    )
    completion = raw.parse()
    assert raw.headers["x-dreamseed-backend"] == "general"
    assert completion.model == "mistralai/Mistral-7B-Instruct-v0.3"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.startswith("Simulated answer")
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_streaming_with_a_korean_prompt(client: openai.OpenAI, fresh: Stack) -> None:
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "파이썬으로 피보나치 함수를 작성해 주세요"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert {c.model for c in chunks} == {"Qwen/Qwen2.5-Coder-7B-Instruct"}
    assert text.startswith("Simulated answer from Qwen2.5-Coder-7B-Instruct.")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert fresh.sims["code"].stats()["last_body"]["messages"][0]["content"] == "파이썬으로 피보나치 함수를 작성해 주세요"


def test_text_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="fast", prompt="빠른 요약", max_tokens=3)
    assert completion.model == "microsoft/Phi-3-mini-4k-instruct"
    assert completion.choices[0].finish_reason == "length"


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "auto" and {"general", "code", "fast", "general70"} <= set(ids)


def test_errors_become_typed_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    assert "Available models: auto" in missing.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="auto", messages=[])
    assert bad.value.param == "messages"

    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="dead", messages=[{"role": "user", "content": "hi"}])
    assert down.value.status_code == 502 and down.value.code == "backend_unreachable"


def test_error_mid_stream_raises_in_the_sdk(client: openai.OpenAI, fresh: Stack) -> None:
    fresh.sims["general"].configure(crash_after=3)
    stream = client.chat.completions.create(model="general", messages=[{"role": "user", "content": "hi"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as broken:
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 1 + 3  # the role chunk, three tokens
    assert "lost mid-stream" in broken.value.message
