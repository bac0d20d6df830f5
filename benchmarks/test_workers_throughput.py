"""Throughput when the proxy is CPU-bound (a backend answering at once), at 1 and 2 workers
(`dreamseed serve --workers N`), against the backend directly, in one run, interleaved round by round.

On this 2-core machine the load generator and the simulated backend share the two cores with the
proxy, so a second worker can only take what they leave; on a bigger host each worker adds up to a
core (benchmarks/README.md, "Workers").
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from harness import MODEL, BenchStack, serving_cpu_seconds, start_proxy, write_policies
from loadgen import build_request, run


def test_throughput_cpu_bound_1_and_2_workers(benchmark, bench_stack: BenchStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    sim = bench_stack.sim
    sim.configure(ttft=0.0, token_delay=0.0)  # answers at once: the proxy is the bottleneck (the sim is shared)
    policies = write_policies(
        tmp_path / "p",
        {"general": {"url": sim.url, "model": MODEL, "context_length": 4096, "max_concurrency": 512,
                     "timeouts": {"connect": 5, "read": 30, "write": 10, "pool": 10}}},
        {"rules": [{"name": "default", "target": "general"}]},
    )
    proxies = {n: start_proxy(policies, extra=["--no-access-log", "--workers", str(n)]) for n in (1, 2)}
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    direct_body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    concurrency, total = 16, bench_stack.scale(short=600, full=3000)
    rounds = bench_stack.scale(short=2, full=3)

    def measure() -> dict[str, Any]:
        targets = {"direct": (sim.url, build_request(sim.url, "/v1/chat/completions", direct_body))}
        targets |= {f"workers{n}": (p.url, build_request(p.url, "/v1/chat/completions", body)) for n, p in proxies.items()}
        for url, request in targets.values():
            run(url, request, concurrency=concurrency, total=200)  # warm
        rps: dict[str, list[float]] = {name: [] for name in targets}
        cpu = {name: 0.0 for name in targets}
        pids = {"direct": sim.popen.pid} | {f"workers{n}": p.popen.pid for n, p in proxies.items()}
        errors = 0
        for _ in range(rounds):
            for name, (url, request) in targets.items():
                before = serving_cpu_seconds(pids[name])
                result = run(url, request, concurrency=concurrency, total=total)
                cpu[name] += serving_cpu_seconds(pids[name]) - before
                rps[name].append(result.throughput)
                errors += result.errors
        out: dict[str, Any] = {name: statistics.median(values) for name, values in rps.items()}
        # CPU per request of what serves (the proxy's workers; the backend for direct): one core
        # serves about 1e6 / this many requests a second, which is how more workers scale on a host
        # whose cores are not also running the load generator and the backend.
        for name in ("workers1", "workers2"):
            out[f"{name}_cpu_us_per_request"] = cpu[name] / (total * rounds) * 1e6
        out["workers1_over_direct"] = out["workers1"] / out["direct"]
        out["workers2_over_direct"] = out["workers2"] / out["direct"]
        out["workers2_over_workers1"] = out["workers2"] / out["workers1"]
        out["errors"] = errors
        return out

    try:
        result = benchmark.pedantic(measure, rounds=1, iterations=1)
        benchmark.extra_info.update(result)
        assert result["errors"] == 0
    finally:
        for proxy in proxies.values():
            proxy.stop()
