"""Proxy overhead: the same requests sent directly to a simulated backend and through the proxy,
in one run, interleaved round by round so that drift in the machine's speed hits both alike.

Reported in each benchmark's extra_info (and checked by benchmarks/gate.py): added latency at
P50/P95/P99, added time to first byte (streaming), and throughput through the proxy as a
fraction of direct.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import MODEL, BenchStack, rss_mb
from loadgen import LoadResult, build_request, percentile, run
from support import Process, Sim


def chat_body(model: str, stream: bool, max_tokens: int = 16) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of Korea?"}],
                       "stream": stream, "max_tokens": max_tokens}).encode()


@dataclass(frozen=True)
class Proxied:
    """One proxy to measure against the backend directly, and the headers its requests carry."""
    proxy: Process
    headers: dict[str, str] | None = None


def compare(stack: BenchStack, *, stream: bool, concurrency: int, requests: int, rounds: int,
            headers: dict[str, str] | None = None, max_tokens: int = 16) -> dict[str, Any]:
    """The bench stack's proxy against its backend directly: compare_each with one proxy."""
    return compare_each(stack.sim, {"proxy": Proxied(stack.proxy, headers)}, stream=stream, concurrency=concurrency,
                        requests=requests, rounds=rounds, max_tokens=max_tokens)["proxy"]


def compare_each(sim: Sim, proxies: dict[str, Proxied], *, stream: bool, concurrency: int, requests: int, rounds: int,
                 max_tokens: int = 16,
                 on_round: Callable[[int, str, dict[str, float]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Each proxy against the backend directly, round by round: in every round each proxy in turn
    gets a direct run and then its own run, back to back. A stall of this shared machine (seconds,
    now and then) then lands in one round of one proxy, and the figures, medians over the rounds,
    do not move with it; measured one proxy after another, a stall moved every round of one of them
    (the streaming floor read -22.9 ms one run and 1.0 the next). `on_round` gets each round's
    figures as they come (interleaved.py prints them)."""
    direct_request = build_request(sim.url, "/v1/chat/completions", chat_body(MODEL, stream, max_tokens))
    proxy_requests = {name: build_request(p.proxy.url, "/v1/chat/completions", chat_body("auto", stream, max_tokens),
                                          p.headers) for name, p in proxies.items()}
    warm = max(concurrency * 4, 50)
    run(sim.url, direct_request, concurrency=concurrency, total=warm)
    for name, p in proxies.items():
        run(p.proxy.url, proxy_requests[name], concurrency=concurrency, total=warm)
    direct: dict[str, list[LoadResult]] = {name: [] for name in proxies}
    proxied: dict[str, list[LoadResult]] = {name: [] for name in proxies}
    proxy_cpu = dict.fromkeys(proxies, 0.0)
    backend_cpu = dict.fromkeys(proxies, 0.0)
    for round_ in range(1, rounds + 1):
        for name, p in proxies.items():
            before = cpu_seconds(sim.popen.pid)
            d = run(sim.url, direct_request, concurrency=concurrency, total=requests)
            backend_cpu[name] += cpu_seconds(sim.popen.pid) - before
            before = serving_cpu_seconds(p.proxy.popen.pid)
            r = run(p.proxy.url, proxy_requests[name], concurrency=concurrency, total=requests)
            cpu = serving_cpu_seconds(p.proxy.popen.pid) - before
            proxy_cpu[name] += cpu
            direct[name].append(d)
            proxied[name].append(r)
            if on_round is not None:
                on_round(round_, name, {
                    "added_p95_ms": added_ms(d, r, "latencies", 95),
                    "added_ttfb_p95_ms": added_ms(d, r, "first_bytes", 95),
                    "throughput_ratio": r.throughput / d.throughput if d.throughput else 0.0,
                    "proxy_cpu_us_per_request": us_per_request(cpu, [r])})
    return {name: summary(direct[name], proxied[name], proxy_cpu[name], backend_cpu[name], stream=stream,
                          concurrency=concurrency) for name in proxies}


def added_ms(direct: LoadResult, proxied: LoadResult, attribute: str, q: float) -> float:
    """What the proxy added at percentile q in one round: its run minus the direct run before it."""
    return (percentile(getattr(proxied, attribute), q) - percentile(getattr(direct, attribute), q)) * 1e3


def us_per_request(seconds: float, results: list[LoadResult]) -> float:
    """CPU seconds spent over the requests of these runs, in microseconds a request."""
    return seconds / max(1, sum(r.count + r.errors for r in results)) * 1e6


def summary(direct: list[LoadResult], proxied: list[LoadResult], proxy_cpu: float, backend_cpu: float, *,
            stream: bool, concurrency: int) -> dict[str, Any]:
    """One proxy's figures from its rounds: round i's proxied run against round i's direct run."""
    def pooled(results: list[LoadResult], attribute: str) -> list[float]:
        return [v for r in results for v in getattr(r, attribute)]

    d_lat, p_lat = pooled(direct, "latencies"), pooled(proxied, "latencies")
    out: dict[str, Any] = {"concurrency": concurrency, "stream": stream, "requests": sum(r.count + r.errors for r in proxied)}

    def added(attribute: str, q: float) -> float:
        """What the proxy adds at percentile q: each round's proxied minus that round's direct (run
        back to back), the median over the rounds. A stall of this shared machine during one
        sub-run (CI read a bare forwarder's streaming P95 12 ms over direct once) then moves one
        round, not the figure; pooled over the rounds it moved the gate."""
        return statistics.median(added_ms(d, p, attribute, q) for d, p in zip(direct, proxied, strict=True))

    for q in (50, 95, 99):
        out[f"direct_p{q}_ms"] = percentile(d_lat, q) * 1e3
        out[f"proxy_p{q}_ms"] = percentile(p_lat, q) * 1e3
        out[f"added_p{q}_ms"] = added("latencies", q)
    for q in (50, 95):
        out[f"added_ttfb_p{q}_ms"] = added("first_bytes", q)
    out["direct_rps"] = statistics.median(r.throughput for r in direct)
    out["proxy_rps"] = statistics.median(r.throughput for r in proxied)
    out["throughput_ratio"] = out["proxy_rps"] / out["direct_rps"]
    out["errors"] = sum(r.errors for r in direct + proxied)
    # CPU the proxy process spent per request: far steadier than tail latency on a shared machine.
    out["proxy_cpu_us_per_request"] = us_per_request(proxy_cpu, proxied)
    # The same for the simulated backend (also a Python ASGI server) answering the direct requests:
    # the ratio of the two cancels the machine's speed, which moves the absolute figure twofold
    # between CI machines.
    backend_us = us_per_request(backend_cpu, direct)
    out["backend_cpu_us_per_request"] = backend_us
    out["proxy_cpu_per_backend_cpu"] = out["proxy_cpu_us_per_request"] / max(backend_us, 1.0)
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serving_cpu_seconds(pid: int) -> float:
    """CPU time of the processes that serve: the proxy itself and its forked workers (--workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as found:
        children = [int(c) for c in found.read().split()]
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children)


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
    from support import start_proxy, write_policies

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

