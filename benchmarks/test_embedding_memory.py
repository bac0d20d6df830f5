"""Memory of a proxy serving maximum-size embedding requests (#15: 32 inputs of ~3,600
characters once took the proxy from 1.3 to 3.1 GB, for good).

A maximum-size request is the most one request may ask for under rag.yaml's defaults: 32 inputs
of 252 tokens (all-MiniLM-L6-v2 reads 256; longer inputs are refused), 8,064 tokens in all
(`max_request_tokens` 8,192). The measure is the proxy's RSS after them, once a few small
requests have run, as growth over its RSS after one small warm-up request; the gate holds it
within a stated bound (without ONNX Runtime's memory arena it goes back to the baseline). About 2 s of CPU per
request on 2 cores: short mode sends 10, full mode 1,000 (some 35 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from harness import SEED_POLICIES, BenchStack, rss_mb, start_proxy, write_policies, write_rag

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SIZE_INPUT = "word " * 250  # 252 tokens with [CLS] and [SEP]


def test_embedding_rss_after_maximum_size_requests(benchmark, bench_stack: BenchStack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rag = yaml.safe_load((SEED_POLICIES / "rag.yaml").read_text(encoding="utf-8"))
    rag.pop("backends", None)  # the seed's per-backend settings name backends this catalog lacks
    rag.pop("rules", None)
    rag["defaults"]["enabled"] = True
    policies = write_rag(write_policies(tmp_path / "p", {"general": {"url": bench_stack.sim.url, "model": "bench/model",
                                                                     "context_length": 4096}},
                                        {"rules": [{"name": "default", "target": "general"}]}), rag)
    proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(tmp_path / "state")}, extra=["--no-access-log"])
    try:
        url = f"{proxy.url}/v1/embeddings"
        assert httpx.post(url, json={"model": MODEL, "input": "warm up"}, timeout=60).status_code == 200
        idle = rss_mb(proxy.popen.pid)
        count = bench_stack.scale(short=10, full=1000)
        body = {"model": MODEL, "input": [MAX_SIZE_INPUT] * 32}

        def measure() -> dict[str, Any]:
            for _ in range(count):
                response = httpx.post(url, json=body, timeout=120)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["prompt_tokens"] == 32 * 252
            for _ in range(5):  # ordinary traffic after the burst
                assert httpx.post(url, json={"model": MODEL, "input": "a small one"}, timeout=60).status_code == 200
            after = rss_mb(proxy.popen.pid)
            return {"requests": count, "tokens_per_request": 32 * 252, "rss_idle_mb": idle, "rss_after_mb": after,
                    "rss_growth_mb": after - idle}

        benchmark.extra_info.update(benchmark.pedantic(measure, rounds=1, iterations=1))
    finally:
        proxy.stop()
