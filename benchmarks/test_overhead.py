"""Proxy overhead: the same requests sent directly to a simulated backend and through the proxy,
in one run, interleaved round by round so that drift in the machine's speed hits both alike.

Reported in each benchmark's extra_info (and checked by benchmarks/gate.py): added latency at
P50/P95/P99, added time to first byte (streaming), and throughput through the proxy as a
fraction of direct.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness import MODEL, BenchStack, chat_body, compare, rss_mb
from loadgen import build_request, run


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("concurrency", [1, 16, 64])
def test_overhead_20ms_backend(benchmark, bench_stack: BenchStack, stream: bool, concurrency: int) -> None:  # type: ignore[no-untyped-def]
    """The seed's 7B target shape: a backend answering in 20 ms."""
    bench_stack.sim.configure(ttft=0.02, token_delay=0.0)
    requests = bench_stack.scale(short=max(concurrency * 25, 100), full=max(concurrency * 100, 400))
    rounds = bench_stack.scale(short=3, full=3)  # three: the added figures are medians over rounds (compare)
    result = benchmark.pedantic(
        compare, args=(bench_stack,), kwargs={"stream": stream, "concurrency": concurrency, "requests": requests,
                                              "rounds": rounds}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["errors"] == 0


def test_throughput_50ms_backend_c64(benchmark, bench_stack: BenchStack) -> None:  # type: ignore[no-untyped-def]
    bench_stack.sim.configure(ttft=0.05, token_delay=0.0)
    requests = bench_stack.scale(short=1500, full=6000)
    result = benchmark.pedantic(
        compare, args=(bench_stack,), kwargs={"stream": False, "concurrency": 64, "requests": requests,
                                              "rounds": bench_stack.scale(short=2, full=3)}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["errors"] == 0


def test_load_generator_is_not_the_bottleneck(benchmark, bench_stack: BenchStack) -> None:  # type: ignore[no-untyped-def]
    """Direct at concurrency 128 must go well beyond direct at 64 (the backend takes 50 ms, so
    an unbounded client doubles its rate); if it does not, the client is what limits the runs."""
    bench_stack.sim.configure(ttft=0.05, token_delay=0.0)
    request = build_request(bench_stack.sim.url, "/v1/chat/completions", chat_body(MODEL, False))
    total = bench_stack.scale(short=2000, full=8000)

    def measure() -> dict[str, float]:
        run(bench_stack.sim.url, request, concurrency=128, total=400)
        at64 = run(bench_stack.sim.url, request, concurrency=64, total=total).throughput
        at128 = run(bench_stack.sim.url, request, concurrency=128, total=total * 2).throughput
        return {"direct_rps_c64": at64, "direct_rps_c128": at128, "scaling_128_over_64": at128 / at64}

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)


def test_overload_10x(benchmark, bench_stack: BenchStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Ten times the seed's 16 concurrent requests (160) against a proxy whose backend allows 16:
    the error rate and the proxy's memory while it holds the excess."""
    from harness import start_proxy, write_policies

    bench_stack.sim.configure(ttft=0.05, token_delay=0.0)
    policies = write_policies(
        tmp_path / "overload",
        {"general": {"url": bench_stack.sim.url, "model": MODEL, "context_length": 4096, "max_concurrency": 16,
                     "timeouts": {"connect": 5, "read": 30, "write": 10, "pool": 10}}},
        {"rules": [{"name": "default", "target": "general"}]},
    )
    proxy = start_proxy(policies, extra=["--no-access-log"])
    try:
        request = build_request(proxy.url, "/v1/chat/completions", chat_body("auto", False))
        pid = proxy.popen.pid
        before = rss_mb(pid)
        total = bench_stack.scale(short=1600, full=8000)

        def measure() -> dict[str, Any]:
            result = run(proxy.url, request, concurrency=160, total=total)
            return {"concurrency": 160, "backend_limit": 16, "requests": total, "error_rate": result.error_rate,
                    "statuses": {str(k): v for k, v in result.statuses.items()}, "proxy_rps": result.throughput,
                    "rss_before_mb": before, "rss_peak_mb": rss_mb(pid, "VmHWM"),
                    "rss_growth_mb": rss_mb(pid, "VmHWM") - before}

        outcome = benchmark.pedantic(measure, rounds=1, iterations=1)
        benchmark.extra_info.update(outcome)
    finally:
        proxy.stop()

