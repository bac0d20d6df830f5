"""What the benchmarks share, in one place: the simulated backend and proxy they measure against
(through tests/support.py, the tests' helpers), the request bodies and client key of the
configuration users run, and the round-by-round comparison against direct.

The suites, `interleaved.py` and `relay_instructions.py` import from here only. Run as pytest,
pyproject.toml's `pythonpath` puts tests/ and benchmarks/ on the path; run as a script, this module
does it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "tests") not in sys.path:  # a script run (python3 benchmarks/...), not pytest
    sys.path.insert(0, str(HERE.parent / "tests"))

from loadgen import LoadResult, build_request, percentile, run  # noqa: E402
from support import (  # noqa: E402
    ROOT,
    SEED_POLICIES,
    App,
    Process,
    Sim,
    rag_model_dir,
    request_scope,
    running,
    spawn,
    start_proxy,
    start_sim,
    write_policies,
    write_rag,
)

__all__ = ["ROOT", "SEED_POLICIES", "App", "LoadResult", "Process", "Sim", "build_request", "percentile", "rag_model_dir",
           "request_scope", "run", "running", "spawn", "start_proxy", "start_sim", "write_policies", "write_rag"]

MODEL = "bench/model"
MODE = os.environ.get("DREAMSEED_BENCH_MODE", "short")
if MODE not in ("short", "full"):
    raise SystemExit(f"DREAMSEED_BENCH_MODE must be short or full, not {MODE!r}")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak (VmHWM), in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class BenchStack:
    sim: Sim
    proxy: Process
    mode: str

    def scale(self, short: int, full: int) -> int:
        return short if self.mode == "short" else full


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


# --- the configuration users run -------------------------------------------------------------

KEY = "bench-client-key"
KEY_HEADER = (b"authorization", f"Bearer {KEY}".encode())  # the client key as an ASGI scope carries it
ADMIN = "bench-admin-key"


def catalog(url: str) -> dict[str, Any]:
    """Four backends like the seed's, on the one simulated server (only general gets this traffic)."""
    limits = {"context_length": 4096, "max_concurrency": 512,
              "timeouts": {"connect": 5, "read": 30, "write": 10, "pool": 10}}
    return {name: {"url": url, "model": model, **limits} for name, model in
            (("general", MODEL), ("code", "bench/code"), ("fast", "bench/fast"), ("general70", "bench/general70"))}


def shipped_policies(directory: Path, url: str) -> Path:
    """Policy files as users run them: the shipped routing rules (policies/routing.yaml) over catalog(url)."""
    seed_routing = yaml.safe_load((SEED_POLICIES / "routing.yaml").read_text(encoding="utf-8"))
    return write_policies(directory, catalog(url), seed_routing)


def headers_for(name: str) -> dict[str, str]:
    """Every proxy gets the client key (the floor ignores it, but reads the same bytes) but no_keys."""
    return {} if name == "no_keys" else {"authorization": f"Bearer {KEY}"}


async def cpu_per_request(app: App, body: bytes, count: int) -> float:
    """CPU seconds of this process per request, `count` requests one after another."""
    scope = request_scope(body, [KEY_HEADER])
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    began = time.process_time()
    for _ in range(count):
        await app(dict(scope), receive, send)
    spent = time.process_time() - began
    assert statuses == [200] * count, sorted(set(statuses))
    return spent / count
