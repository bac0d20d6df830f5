"""Balancing across replicas, measured.

Real servers (`test_balancing_real_replicas`): two llama.cpp `llama-server` replicas of SmolLM2-135M
(one thread each, a slot per conversation) behind the proxy, and one replica alone for the baseline.
The workload is multi-turn chat in a closed loop: two tenants, each with a long system prompt of its
own, several conversations per tenant (more conversations than replicas), several turns each, every
conversation one client sending its next turn when the last answer is in. Per balance mode: time to
first token P50/P95 (streamed), the whole run's time, the share of prompt tokens each replica served
from its prompt cache (`usage.prompt_tokens_details.cached_tokens` in the last streamed chunk, the
same number llama.cpp reports as `timings.cache_n`), and each replica's share of the requests.

Simulated replicas (`test_balancing_slow_replica`, `test_ten_replicas_take_ten_times_the_clients`):
three simulated vLLM servers, one three times slower than the others, in each mode against the
all-fast case; and ten replicas (max_concurrency 16 each, a 7B model's pace: 100 ms to the first
token, 32 tokens at 20 ms) taking 160 concurrent clients, against one replica taking 16, each next
to the same load sent to the servers directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness import MODE, Process, build_request, percentile, start_proxy, start_sim, write_policies
from loadgen import LoadResult, run_load

MODES = ("round_robin", "least_loaded", "prefix_affinity")
TENANT_PROMPTS = {
    "acme": "You are the support assistant of Acme's deployment team. Answer in one short sentence, cite the runbook "
            "section when there is one, and never invent a command. The runbooks cover the proxy, the model servers, "
            "the retrieval store, monitoring and alerting, backups and restores, and on-call hand-over. ",
    "globex": "You answer questions from Globex engineers about their data platform: ingestion jobs, the warehouse, "
              "dashboards, access requests and cost reports. Be brief, say which team owns a system when asked, and "
              "point to the request form for anything that needs approval. ",
}


def workload() -> tuple[int, int, int]:
    """(system prompt repeats, conversations per tenant, turns per conversation)."""
    return (2, 3, 5) if MODE == "short" else (2, 4, 6)


ANSWER_TOKENS = 48  # each answer joins the conversation's history, which the next turn sends again


async def conversation(client: httpx.AsyncClient, url: str, tenant: str, number: int, turns: int, repeats: int,
                       results: list[dict[str, Any]]) -> None:
    messages = [{"role": "system", "content": TENANT_PROMPTS[tenant] * repeats},
                {"role": "user", "content": f"[{tenant} #{number}] Where do I find the logs of the proxy?"}]
    for turn in range(turns):
        started = time.perf_counter()
        first: float | None = None
        answer, usage, replica = "", {}, ""
        async with client.stream("POST", f"{url}/v1/chat/completions", json={
                "model": "general", "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            replica = response.headers.get("x-dreamseed-replica", "general")
            if response.status_code != 200:
                await response.aread()
                raise AssertionError(f"{tenant} #{number} turn {turn}: {response.status_code} {response.text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    text = choice.get("delta", {}).get("content")
                    if text:
                        first = first or time.perf_counter() - started
                        answer += text
                usage = chunk.get("usage") or usage
        results.append({"ttft": first if first is not None else time.perf_counter() - started, "replica": replica,
                        "turn": turn,
                        "prompt": usage.get("prompt_tokens", 0),
                        "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)})
        messages += [{"role": "assistant", "content": answer or "ok"},
                     {"role": "user", "content": f"Thanks. And follow-up {turn + 1}: who owns it?"}]


def run_conversations(url: str) -> dict[str, Any]:
    repeats, per_tenant, turns = workload()
    results: list[dict[str, Any]] = []

    async def everything() -> float:
        async with httpx.AsyncClient(timeout=300) as client:
            started = time.perf_counter()
            await asyncio.gather(*(conversation(client, url, tenant, n, turns, repeats, results)
                                   for n in range(per_tenant) for tenant in TENANT_PROMPTS))
            return time.perf_counter() - started

    total = asyncio.run(everything())
    ttfts = [r["ttft"] * 1e3 for r in results]
    follow_ups = [r["ttft"] * 1e3 for r in results if r["turn"] > 0]
    by_replica = Counter(r["replica"] for r in results)
    prompt = sum(r["prompt"] for r in results)
    cached = sum(r["cached"] for r in results)
    return {"ttft_p50_ms": float(np.percentile(ttfts, 50)), "ttft_p95_ms": float(np.percentile(ttfts, 95)),
            "follow_up_ttft_p50_ms": float(np.percentile(follow_ups, 50)),
            "follow_up_ttft_p95_ms": float(np.percentile(follow_ups, 95)),
            "total_s": total, "cached_share": cached / prompt if prompt else 0.0,
            "requests": len(results), "max_replica_share": max(by_replica.values()) / len(results),
            "replica_requests": dict(by_replica),
            "replica_cached_share": {replica: sum(r["cached"] for r in results if r["replica"] == replica)
                                     / max(sum(r["prompt"] for r in results if r["replica"] == replica), 1)
                                     for replica in by_replica}}


def test_balancing_real_replicas(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, per_tenant, _ = workload()
    slots = per_tenant * len(TENANT_PROMPTS)  # a slot for every conversation: a replica may hold them all

    def measure() -> dict[str, Any]:
        result: dict[str, Any] = {}
        for mode in ("single", *MODES):
            servers = [start_replica(slots) for _ in range(1 if mode == "single" else 2)]
            policies = write_policies(tmp_path / mode, {"general": {
                "model": "general", "context_length": 2048, "max_concurrency": slots,
                "timeouts": {"connect": 5, "read": 300, "write": 30, "pool": 300},
                **({"url": servers[0].url} if mode == "single" else
                   {"replicas": [{"url": s.url} for s in servers], "balance": mode})}},
                {"rules": [{"name": "default", "target": "general"}]})
            proxy = start_proxy(policies, extra=["--no-access-log"])
            try:
                for key, value in run_conversations(proxy.url).items():
                    result[f"{mode}_{key}"] = value
            finally:
                proxy.stop()
                for server in servers:
                    server.stop()
        result["affinity_over_round_robin_ttft_p95"] = (result["prefix_affinity_ttft_p95_ms"]
                                                        / result["round_robin_ttft_p95_ms"])
        result["affinity_over_round_robin_follow_up_ttft_p95"] = (result["prefix_affinity_follow_up_ttft_p95_ms"]
                                                                  / result["round_robin_follow_up_ttft_p95_ms"])
        result["affinity_cached_share_over_single"] = (result["prefix_affinity_cached_share"]
                                                       / max(result["single_cached_share"], 1e-9))
        return result

    benchmark.extra_info.update(benchmark.pedantic(measure, rounds=1, iterations=1))


def start_replica(slots: int) -> Any:
    """One llama-server replica on one core's worth of threads (two fit this machine)."""
    from dreamseed.standins.local_model import LlamaServer
    from real_server import SMOLLM_ID, real_model

    return LlamaServer.start(real_model(), SMOLLM_ID, context=2048, parallel=slots,
                             extra=["--threads", "1", "--threads-batch", "1"])


def closed_loop(url: str, concurrency: int, total: int) -> LoadResult:
    body = json.dumps({"model": "general", "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 16}).encode()
    return asyncio.run(run_load(url, build_request(url, "/v1/chat/completions", body), concurrency=concurrency,
                                total=total))


def balanced_proxy(tmp_path: Path, name: str, urls: list[str], balance: str, max_concurrency: int = 64,
                   workers: int | None = 1) -> Process:
    policies = write_policies(tmp_path / name, {"general": {
        "model": "general", "context_length": 4096, "max_concurrency": max_concurrency, "max_queue": 512,
        "health": {"interval": 0.5},
        **({"url": urls[0]} if len(urls) == 1 else {"replicas": [{"url": u} for u in urls], "balance": balance})}},
        {"rules": [{"name": "default", "target": "general"}]})
    return start_proxy(policies, extra=["--no-access-log"], workers=workers)


def test_balancing_slow_replica(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    total = 600 if MODE == "full" else 240
    fast = {"ttft": 0.03, "token_delay": 0.003, "tokens": 16}
    slow = {k: v * 3 if k != "tokens" else v for k, v in fast.items()}

    def measure() -> dict[str, Any]:
        sims = [start_sim("general", **fast) for _ in range(3)]
        result: dict[str, Any] = {}
        try:
            for case, mode in (("all_fast", "least_loaded"), ("slow_least_loaded", "least_loaded"),
                               ("slow_round_robin", "round_robin"), ("slow_prefix_affinity", "prefix_affinity")):
                sims[2].configure(**(fast if case == "all_fast" else slow))
                proxy = balanced_proxy(tmp_path, case, [s.url for s in sims], mode)
                try:
                    closed_loop(proxy.url, 12, 60)  # warm: connections, and each replica's response time
                    load = closed_loop(proxy.url, 12, total)
                finally:
                    proxy.stop()
                result[f"{case}_p95_ms"] = percentile(load.latencies, 95) * 1e3
                result[f"{case}_errors"] = load.errors
            for case in ("slow_least_loaded", "slow_round_robin", "slow_prefix_affinity"):
                result[f"{case}_over_all_fast_p95"] = result[f"{case}_p95_ms"] / result["all_fast_p95_ms"]
        finally:
            for sim in sims:
                sim.stop()
        return result

    benchmark.extra_info.update(benchmark.pedantic(measure, rounds=1, iterations=1))


async def _direct_spread(urls: list[str], per_server: int, total: int) -> LoadResult:
    """The same load sent to the servers directly, `per_server` clients each: what the proxy adds to."""
    body = json.dumps({"model": "general", "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 16}).encode()
    parts = await asyncio.gather(*(run_load(u, build_request(u, "/v1/chat/completions", body), concurrency=per_server,
                                            total=total // len(urls)) for u in urls))
    merged = LoadResult()
    for part in parts:
        merged.latencies += part.latencies
        merged.errors += part.errors
        merged.elapsed = max(merged.elapsed, part.elapsed)
    return merged


def test_ten_replicas_take_ten_times_the_clients(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    per = 20 if MODE == "full" else 8  # requests per client
    # A 7B model's pace, 32 tokens at 20 ms, with the first token after 10-190 ms: real prompts vary,
    # and equal service times would keep 160 closed-loop clients in lockstep, arriving as one burst.
    knobs = {"ttft": 0.1, "ttft_jitter": 0.9, "token_delay": 0.02, "tokens": 32}

    def measure() -> dict[str, Any]:
        sims = [start_sim("general", **knobs) for _ in range(10)]
        result: dict[str, Any] = {}
        try:
            for replicas, clients in ((1, 16), (10, 160)):
                urls = [s.url for s in sims[:replicas]]
                direct = asyncio.run(_direct_spread(urls, 16, clients * per))
                proxy = balanced_proxy(tmp_path, f"r{replicas}", urls, "least_loaded", max_concurrency=16,
                                       workers=None)  # one worker per core, as users run it
                try:
                    closed_loop(proxy.url, clients, clients * 2)  # warm
                    proxied = closed_loop(proxy.url, clients, clients * per)
                finally:
                    proxy.stop()
                result[f"r{replicas}_errors"] = proxied.errors + direct.errors
                result[f"r{replicas}_added_p95_ms"] = (percentile(proxied.latencies, 95)
                                                       - percentile(direct.latencies, 95)) * 1e3
                result[f"r{replicas}_throughput_ratio"] = proxied.throughput / max(direct.throughput, 1e-9)
            result["added_p95_ms_10x_over_1x"] = result["r10_added_p95_ms"] - result["r1_added_p95_ms"]
        finally:
            for sim in sims:
                sim.stop()
        return result

    benchmark.extra_info.update(benchmark.pedantic(measure, rounds=1, iterations=1))

