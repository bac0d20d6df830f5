"""Schemathesis against the proxy's own OpenAPI document: no client input may yield a 500 (or any
undocumented status, content type or body shape). Bounded: a fixed number of examples, deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from support import start_proxy, start_sim, write_policies, write_rag


def test_the_openapi_document_describes_the_request_structs(tmp_path: Path) -> None:
    sim = start_sim("m")
    try:
        policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 1024}},
                                  {"rules": [{"name": "default", "target": "general"}]})
        proxy = start_proxy(policies)
        try:
            document = httpx.get(f"{proxy.url}/openapi.json").json()
        finally:
            proxy.stop()
    finally:
        sim.stop()
    chat = document["components"]["schemas"]["ChatRequest"]
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["model"]["enum"] == ["auto", "general", "m"]
    assert chat["properties"]["messages"]["minItems"] == 1
    assert set(document["paths"]["/v1/chat/completions"]["post"]["responses"]) >= {"200", "400", "404", "413", "429", "502"}
    embeddings = document["components"]["schemas"]["EmbeddingRequest"]
    assert embeddings["properties"]["model"]["enum"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert {"/v1/embeddings", "/admin/rag", "/admin/rag/ingest", "/admin/rag/search", "/admin/rag/documents"} \
        <= set(document["paths"])


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    sim = start_sim("m", tokens=3)
    try:
        policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 1024}},
                                  {"rules": [{"name": "default", "target": "general"}]})
        # RAG on, so /v1/embeddings and the admin RAG endpoints meet fuzzed input with a real store.
        write_rag(policies, {"defaults": {"enabled": True}})
        proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "fuzz-admin", "DREAMSEED_STATE_DIR": str(tmp_path / "s")})
        try:
            result = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", "run", f"{proxy.url}/openapi.json",
                 "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                             "response_schema_conformance",
                 "--max-examples", "60", "--generation-deterministic", "--request-timeout", "10", "--no-color",
                 # Client endpoints are open here; the admin key reaches the admin ones.
                 "-H", "Authorization: Bearer fuzz-admin"],
                capture_output=True, text=True, timeout=300,
            )
            assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
            assert "passed" in result.stdout
            assert "Traceback" not in proxy.log() and "unhandled error" not in proxy.log()
            assert sim.stats()["requests"] > 0  # valid requests did reach the backend
        finally:
            proxy.stop()
    finally:
        sim.stop()
