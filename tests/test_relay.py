"""The proxy as a client sees it: a real proxy process in front of simulated vLLM processes."""

from __future__ import annotations

import re
import time

import httpx
import msgspec
import pytest

from conftest import ADMIN_KEY, REMOTE_KEY, Stack
from support import free_port, start_proxy, write_policies

SEED_MODELS = {
    "general": "mistralai/Mistral-7B-Instruct-v0.3",
    "code": "Qwen/Qwen2.5-Coder-7B-Instruct",
    "fast": "microsoft/Phi-3-mini-4k-instruct",
    "general70": "meta-llama/Llama-3.1-70B-Instruct",
}


def chat(content: str, model: str = "auto", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("prompt", "rule", "backend"),
    [
        ("파이썬으로 정렬 코드를 작성해 주세요", "code", "code"),
        ("Explain this FUNCTION to me", "code", "code"),
        ("빠른 답변 부탁해요", "fast", "fast"),
        ("What is the capital of Korea?", "default", "general"),
        ("x" * 2001, "long-prompt", "general70"),
        ("x" * 2000, "default", "general"),
    ],
)
def test_auto_routes_by_the_seed_rules(fresh: Stack, prompt: str, rule: str, backend: str) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat(prompt))
    assert response.status_code == 200, response.text
    assert response.headers["x-dreamseed-rule"] == rule
    assert response.headers["x-dreamseed-backend"] == backend
    assert response.json()["model"] == SEED_MODELS[backend]
    assert fresh.sims[backend].stats()["finished"] == 1


def test_forwarded_body_keeps_client_fields_and_names_the_served_model(fresh: Stack) -> None:
    body = chat("안녕하세요", temperature=0.2, max_tokens=5, top_k=7, seed=11)
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    seen = fresh.sims["general"].stats()["last_body"]
    assert seen == {**body, "model": SEED_MODELS["general"]}
    assert response.json()["choices"][0]["finish_reason"] == "length"  # max_tokens reached the backend


def test_model_naming_a_backend_or_its_model_id_goes_straight_there(fresh: Stack) -> None:
    with fresh.client() as client:
        by_name = client.post("/v1/chat/completions", json=chat("빠른 답변", model="code"))
        by_id = client.post("/v1/chat/completions", json=chat("hello", model=SEED_MODELS["fast"]))
    assert (by_name.headers["x-dreamseed-rule"], by_name.headers["x-dreamseed-backend"]) == ("direct", "code")
    assert (by_id.headers["x-dreamseed-rule"], by_id.headers["x-dreamseed-backend"]) == ("direct", "fast")


def test_unknown_model_is_a_404_listing_the_models(fresh: Stack) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat("hi", model="gpt-4o"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    for name in ("auto", "general", "code", "fast", "general70", SEED_MODELS["code"]):
        assert name in error["message"]
    assert sum(sim.stats()["requests"] for sim in fresh.sims.values()) == 0


def test_remote_backend_gets_its_api_key_but_never_the_clients(fresh: Stack) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat("y" * 3000),
                               headers={"authorization": "Bearer client-key-123"})
    assert response.status_code == 200, response.text
    assert response.headers["x-dreamseed-backend"] == "general70"
    assert fresh.sims["general70"].stats()["last_headers"]["authorization"] == f"Bearer {REMOTE_KEY}"
    with fresh.client() as client:
        client.post("/v1/chat/completions", json=chat("hi"), headers={"authorization": "Bearer client-key-123"})
    assert "authorization" not in fresh.sims["general"].stats()["last_headers"]


def test_request_id_is_kept_returned_and_forwarded(fresh: Stack) -> None:
    with fresh.client() as client:
        given = client.post("/v1/chat/completions", json=chat("hi"), headers={"x-request-id": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        assert fresh.sims["general"].stats()["last_headers"]["x-request-id"] == "trace-42"
        made = client.post("/v1/chat/completions", json=chat("hi"))
        assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
        assert "server" not in made.headers  # the server software is not announced
        assert fresh.sims["general"].stats()["last_headers"]["x-request-id"] == made.headers["x-request-id"]
        # An id with spaces or control characters is replaced, not echoed.
        odd = client.post("/v1/chat/completions", json=chat("hi"), headers={"x-request-id": "a b"})
        assert odd.headers["x-request-id"] != "a b"
        # Errors carry it too.
        failed = client.post("/v1/chat/completions", json=chat("hi", model="nope"), headers={"x-request-id": "e-1"})
        assert failed.status_code == 404 and failed.headers["x-request-id"] == "e-1"


def test_stream_passes_through_chunk_by_chunk(fresh: Stack) -> None:
    sim = fresh.sims["general"]
    sim.configure(tokens=4, token_delay=0.4)
    with fresh.client() as client, client.stream(
        "POST", "/v1/chat/completions", json=chat("hello", stream=True)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-dreamseed-backend"] == "general"
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # We hold the first chunk while the backend is still generating the rest.
        during = sim.stats()
        assert during["active"] == 1 and during["finished"] == 0
        assert msgspec.json.decode(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        rest = sse_events(list(lines))
    assert rest[-1] == "[DONE]"
    assert len(rest) == 4 + 1 + 1  # every token (the first chunk only named the role), the finish chunk, [DONE]
    assert sim.stats()["finished"] == 1


def test_text_completions_stream_and_not(fresh: Stack) -> None:
    with fresh.client() as client:
        plain = client.post("/v1/completions", json={"model": "auto", "prompt": "빠른 요약"})
        assert plain.status_code == 200
        assert plain.headers["x-dreamseed-backend"] == "fast"
        assert plain.json()["object"] == "text_completion"
        with client.stream("POST", "/v1/completions", json={"model": "auto", "prompt": ["def f():"], "stream": True}) as r:
            events = sse_events(list(r.iter_lines()))
        assert r.headers["x-dreamseed-backend"] == "general"
    assert events[-1] == "[DONE]"
    assert msgspec.json.decode(events[0])["object"] == "text_completion"


def test_client_disconnect_mid_stream_cancels_the_backend_request(fresh: Stack) -> None:
    sim = fresh.sims["general"]
    sim.configure(tokens=100, token_delay=0.1)
    log_before = len(fresh.proxy.log())
    with fresh.client() as client, client.stream(
        "POST", "/v1/chat/completions", json=chat("hello", stream=True)
    ) as response:
        lines = response.iter_lines()  # kept referenced: dropping it would close the connection early
        next(line for line in lines if line.startswith("data: "))
        assert sim.stats()["active"] == 1
    # Leaving the block closed our connection after one chunk; the backend must notice.
    stats = sim.wait_for(lambda s: s["cancelled"] == 1 and s["active"] == 0)
    assert stats["cancelled"] == 1 and stats["active"] == 0 and stats["finished"] == 0
    # The client left; the backend did nothing wrong: no warning blames it.
    time.sleep(0.2)
    assert "stream broke" not in fresh.proxy.log()[log_before:]


def test_backend_crash_mid_stream_ends_with_an_error_event(fresh: Stack) -> None:
    fresh.sims["general"].configure(tokens=10, crash_after=2)
    with fresh.client() as client, client.stream(
        "POST", "/v1/chat/completions", json=chat("hello", stream=True)
    ) as response:
        events = sse_events(list(response.iter_lines()))
    assert response.status_code == 200
    assert len(events) == 5  # the role, two tokens, the error, [DONE]
    error = msgspec.json.decode(events[3])["error"]
    assert error["code"] == "upstream_disconnected" and error["type"] == "server_error"
    assert events[4] == "[DONE]"


def test_connect_failure_is_a_502_in_openai_shape(fresh: Stack) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat("hi", model="dead"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_unreachable" and error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_unreachable_target_falls_back_along_the_chain(fresh: Stack) -> None:
    with fresh.client() as client:
        dead = client.post("/v1/chat/completions", json=chat("hi", model="dead-first"))
        unset = client.post("/v1/chat/completions", json=chat("hi", model="unset-first"))
        none = client.post("/v1/chat/completions", json=chat("hi", model="all-dead"))
    assert dead.status_code == 200
    assert dead.headers["x-dreamseed-backend"] == "general"
    assert dead.headers["x-dreamseed-fallback"] == "dead:unreachable"
    assert unset.status_code == 200
    assert unset.headers["x-dreamseed-fallback"] == "unset:unavailable, dead:unreachable"
    assert none.status_code == 502 and "dead:unreachable, unset:unavailable" in none.json()["error"]["message"]
    assert fresh.sims["general"].stats()["finished"] == 2


def test_read_timeout_is_a_504_or_a_final_stream_error(fresh: Stack) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat("hi", model="slow"))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "backend_timeout"
        with client.stream("POST", "/v1/chat/completions", json=chat("hi", model="slow", stream=True)) as r:
            events = sse_events(list(r.iter_lines()))
    assert msgspec.json.decode(events[0])["error"]["code"] == "upstream_timeout"
    assert events[-1] == "[DONE]"


def test_backend_errors_pass_through_or_are_retried_and_fall_back(fresh: Stack) -> None:
    fast = fresh.sims["fast"]
    fast.configure(error_rate=1.0, error_status=500)
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", json=chat("빠른 답변"))
        streamed = client.post("/v1/chat/completions", json=chat("빠른 답변", stream=True))
    # A 500 is the backend's own answer: passed through, not retried.
    assert response.status_code == 500 and response.json()["error"]["message"] == "simulated failure"
    assert response.headers["x-dreamseed-backend"] == "fast"
    assert streamed.status_code == 500 and streamed.headers["content-type"].startswith("application/json")
    assert fast.stats()["errors"] == 2

    fast.reset()
    fast.configure(error_rate=1.0, error_status=503)
    with fresh.client() as client:
        direct = client.post("/v1/chat/completions", json=chat("hi", model="fast"))
        assert direct.status_code == 503  # retried once (retries: 1), then the last backend's answer
        assert fast.stats()["errors"] == 2
        routed = client.post("/v1/chat/completions", json=chat("빠른 답변"))
    # Routed by a rule with a fallback: retried, then answered by the fallback.
    assert routed.status_code == 200
    assert routed.headers["x-dreamseed-backend"] == "general"
    assert routed.headers["x-dreamseed-fallback"] == "fast:http_503"
    assert fast.stats()["errors"] == 4


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model", "invalid_request"),
        (b'{"model": "auto", "messages": []}', "messages", "invalid_request"),
        (b'{"model": "auto", "messages": "hi"}', "messages", "invalid_request"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model", "invalid_request"),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", "invalid_request"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(fresh: Stack, body: bytes, param: str | None, code: str) -> None:
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code
    assert error["param"] == param
    assert sum(sim.stats()["requests"] for sim in fresh.sims.values()) == 0


def test_oversized_body_is_a_413(fresh: Stack) -> None:
    big = b'{"model": "auto", "messages": [{"role": "user", "content": "' + b"a" * (11 * 1024 * 1024) + b'"}]}'
    with fresh.client() as client:
        response = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(11):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    with fresh.client() as client:
        streamed = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    assert sum(sim.stats()["requests"] for sim in fresh.sims.values()) == 0


def test_unknown_route_is_a_json_404(fresh: Stack) -> None:
    with fresh.client() as client:
        response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_models_lists_every_backend_and_auto(fresh: Stack) -> None:
    with fresh.client() as client:
        data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "auto"
    assert set(SEED_MODELS) <= set(ids)
    code = next(m for m in data if m["id"] == "code")
    assert code["root"] == SEED_MODELS["code"] and code["on_demand"] is True and code["max_model_len"] == 8192


def test_health_and_readiness(fresh: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with fresh.client() as client:
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    backends = ready.json()["backends"]
    assert backends["general"]["state"] == "up" and backends["general"]["circuit"] == "closed"
    # `dead` fails every probe, but this stack's circuits never open (tests/conftest.py): failing, not down.
    assert backends["dead"]["state"] == "failing" and backends["unset"]["state"] == "unavailable"
    # /readyz needs no key, so it shows no details (they name internal addresses): the admin API does.
    assert set(backends["dead"]) == {"state", "circuit", "on_demand"} and "127.0.0.1" not in ready.text
    with fresh.client(headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        detailed = admin.get("/admin/backends").json()["backends"]
    assert "could not connect" in detailed["dead"]["detail"]

    # A proxy whose catch-all backend cannot be reached is alive but not ready.
    policies = write_policies(tmp_path / "p", {"general": {"url": f"http://127.0.0.1:{free_port()}", "model": "m",
                                                           "context_length": 1024}},
                              {"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies)
    try:
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200
        not_ready = httpx.get(f"{proxy.url}/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["backends"]["general"]["state"] == "failing"
    finally:
        proxy.stop()


def test_proxy_refuses_to_start_on_invalid_policies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    policies = write_policies(tmp_path / "p", {"general": {"url": "http://127.0.0.1:1", "model": "m", "context_length": 1}},
                              {"rules": [{"name": "default", "target": "nowhere"}]})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "routing.yaml:" in result.stderr and "unknown backend 'nowhere'" in result.stderr
    assert time.monotonic() - started < 30


def test_a_warning_repeated_by_every_request_is_logged_once_per_interval(fresh: Stack) -> None:
    before = len(fresh.proxy.log())
    with fresh.client() as client:
        for _ in range(30):  # each request finds `dead` unreachable and falls back to general
            response = client.post("/v1/chat/completions", json=chat("hi", model="dead-first"))
            assert response.status_code == 200 and response.headers["x-dreamseed-fallback"].startswith("dead:")
    added = fresh.proxy.log()[before:]
    assert added.count("backend dead unreachable") <= 1, added


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_deeply_nested_json_is_a_400_and_is_counted(fresh: Stack, path: str) -> None:
    """1,000+ levels of nesting anywhere in a body: 400 invalid_json (msgspec's decoder gives up at
    Python's recursion limit), never a 500 traceback; a relayed request is counted and logged."""
    deep = b'{"model": "auto", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "x": ' + \
        b"[" * 5000 + b"]" * 5000 + b"}"
    before = httpx.get(f"{fresh.url}/metrics").text
    with fresh.client() as client:
        response = client.post(path, content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json" and "too deeply" in response.json()["error"]["message"]
    assert "Traceback" not in fresh.proxy.log()
    if path != "/v1/embeddings":
        after = httpx.get(f"{fresh.url}/metrics").text
        pattern = r'dreamseed_requests_total\{[^}]*status="400"[^}]*\} (\S+)'
        counted = sum(float(v) for v in re.findall(pattern, after)) - sum(float(v) for v in re.findall(pattern, before))
        assert counted >= 1
