"""GET /metrics and the access log, through the shared stack (real proxy, simulated backends)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from conftest import Stack
from support import start_proxy, start_sim, write_policies


def scrape(stack: Stack) -> str:
    response = httpx.get(f"{stack.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def value(text: str, series: str) -> float:
    """The value of one series, e.g. 'dreamseed_requests_total{backend="fast",rule="fast",status="200"}'."""
    name, _, labels = series.partition("{")
    wanted = set(labels.rstrip("}").split(",")) if labels else set()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            metric, _, number = line.rpartition(" ")
            found = set(metric[len(name):].strip("{}").split(",")) if "{" in metric else set()
            if wanted <= found and metric.split("{")[0] == name:
                return float(number)
    return 0.0


def chat(stack: Stack, content: str, model: str = "auto", **extra: object) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": content}], **extra})


def test_requests_durations_and_tokens_are_counted(fresh: Stack) -> None:
    before = scrape(fresh)
    assert chat(fresh, "빠른 답변").status_code == 200
    with httpx.stream("POST", f"{fresh.url}/v1/chat/completions", timeout=30,
                      json={"model": "auto", "messages": [{"role": "user", "content": "write code"}], "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        list(response.iter_lines())
    assert chat(fresh, "hi", model="gpt-4o").status_code == 404
    after = scrape(fresh)

    def grew(series: str) -> float:
        return value(after, series) - value(before, series)

    assert grew('dreamseed_requests_total{backend="fast",rule="fast",status="200"}') == 1
    assert grew('dreamseed_requests_total{backend="code",rule="code",status="200"}') == 1
    assert grew('dreamseed_requests_total{backend="none",rule="none",status="404"}') == 1
    assert grew('dreamseed_request_duration_seconds_count{backend="fast"}') == 1
    assert grew('dreamseed_time_to_first_token_seconds_count{backend="code"}') == 1
    assert grew('dreamseed_upstream_duration_seconds_count{backend="code"}') == 1
    assert grew('dreamseed_completion_tokens_total{backend="fast"}') == 16  # from the JSON answer's usage
    assert grew('dreamseed_completion_tokens_total{backend="code"}') == 16  # from the stream's usage chunk
    # Buckets resolve both latency targets.
    assert 'dreamseed_time_to_first_token_seconds_bucket{backend="fast",le="0.1"}' in after
    assert 'dreamseed_request_duration_seconds_bucket{backend="fast",le="0.5"}' in after
    assert "_created" not in after


def test_fallbacks_failures_and_states_are_visible(fresh: Stack) -> None:
    before = scrape(fresh)
    assert chat(fresh, "hi", model="dead-first").status_code == 200
    fresh.sims["general"].configure(crash_after=2)
    with httpx.stream("POST", f"{fresh.url}/v1/chat/completions", timeout=30,
                      json={"model": "general", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        list(r.iter_lines())
    after = scrape(fresh)
    assert value(after, 'dreamseed_fallbacks_total{backend="dead",reason="unreachable",rule="dead-first"}') - \
        value(before, 'dreamseed_fallbacks_total{backend="dead",reason="unreachable",rule="dead-first"}') == 1
    assert value(after, 'dreamseed_requests_total{backend="general",rule="direct",status="502"}') - \
        value(before, 'dreamseed_requests_total{backend="general",rule="direct",status="502"}') == 1
    assert value(after, 'dreamseed_backend_up{backend="general",on_demand="false"}') == 1
    assert value(after, 'dreamseed_backend_up{backend="dead",on_demand="false"}') == 0
    assert value(after, 'dreamseed_backend_circuit_state{backend="general",state="closed"}') == 1
    assert value(after, 'dreamseed_in_flight_requests{backend="general"}') == 0
    assert re.search(r'dreamseed_policy_info\{policy_hash="[0-9a-f]{64}"\} 1\.0', after)
    assert 'dreamseed_policy_reloads_total{result="failure"} 0.0' in after


def test_access_log_is_one_json_object_per_request_without_prompts(fresh: Stack) -> None:
    secret_prompt = "my private question about 빠른 delivery"
    response = chat(fresh, secret_prompt)
    request_id = response.headers["x-request-id"]
    for _ in range(50):
        entries = [json.loads(line) for line in fresh.proxy.lines if line.startswith("{")]
        mine = [e for e in entries if e["request_id"] == request_id]
        if mine:
            break
        time.sleep(0.05)
    (entry,) = mine
    assert entry["rule"] == "fast" and entry["backend"] == "fast" and entry["status"] == 200
    assert entry["duration_ms"] > 0 and entry["ttft_ms"] > 0 and entry["completion_tokens"] == 16
    assert "prompt" not in entry
    assert not any(secret_prompt in line for line in fresh.proxy.lines) and secret_prompt not in fresh.proxy.log()


def test_repeated_warnings_are_rate_limited_and_the_suppressed_counted() -> None:
    import logging

    from dreamseed.logs import RepeatLimiter

    now = [0.0]
    limiter = RepeatLimiter(interval=10, clock=lambda: now[0])

    def record(template: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("dreamseed.rag", level, __file__, 1, template, args, None)

    first = record("RAG degraded (%s): answering without context", "timeout")
    assert limiter.filter(first)
    assert [limiter.filter(record("RAG degraded (%s): answering without context", "x")) for _ in range(547)] == \
        [False] * 547
    assert limiter.filter(record("backend %s unreachable: %s", "general", "refused"))  # another template
    assert limiter.filter(record("a debug line", level=logging.INFO))  # below WARNING: never limited
    now[0] = 10.5
    later = record("RAG degraded (%s): answering without context", "timeout")
    assert limiter.filter(later)
    assert "547 more like this in the last 10 s were not logged" in later.getMessage()


def test_a_stalled_access_log_reader_never_holds_up_requests_and_every_line_is_written_or_counted(
        tmp_path: Path) -> None:
    sim = start_sim("m", tokens=1)
    policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                              {"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, extra=["--access-log-buffer", "50"])
    requests = 1200  # about 400 KB of access log: several times a pipe's 64 KiB
    try:
        proxy.reading.clear()  # from now on nobody reads the proxy's standard output
        time.sleep(0.2)
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            statuses = [client.post("/v1/chat/completions", json=body).status_code for _ in range(requests)]
            metrics = client.get("/metrics").text
        # With the log written on the event loop, the first write into the full pipe would block the
        # whole proxy: every later request would time out.
        assert statuses == [200] * requests, proxy.log()[-2000:]
        dropped = value(metrics, "dreamseed_access_log_dropped_total")
        assert dropped > 0 and value(metrics, "dreamseed_access_log_queued") <= 50
        assert "access log: its destination is not keeping up" in proxy.log()
        proxy.reading.set()  # the reader is back: what was queued gets written
        deadline = time.monotonic() + 10
        logged: list[str] = []
        while time.monotonic() < deadline:
            logged = [line for line in proxy.lines if line.startswith('{"ts"')]
            if len(logged) + dropped >= requests:
                break
            time.sleep(0.1)
        assert len(logged) + dropped == requests  # each line written or counted as dropped
        assert all(json.loads(line)["status"] == 200 for line in logged)
    finally:
        proxy.stop()
        sim.stop()


def test_the_access_log_can_go_to_a_file(tmp_path: Path) -> None:
    sim = start_sim("m", tokens=1)
    policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                              {"rules": [{"name": "default", "target": "general"}]})
    log_file = tmp_path / "access.jsonl"
    proxy = start_proxy(policies, extra=["--access-log-file", str(log_file)])
    try:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
        ids = [httpx.post(f"{proxy.url}/v1/chat/completions", json=body).headers["x-request-id"] for _ in range(3)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not log_file.exists() or len(log_file.read_text().splitlines()) < 3):
            time.sleep(0.05)
        assert [json.loads(line)["request_id"] for line in log_file.read_text().splitlines()] == ids
        assert not any(line.startswith('{"ts"') for line in proxy.lines)  # not on standard output as well
    finally:
        proxy.stop()
        sim.stop()


@pytest.mark.parametrize("log_level", ["info", "warning"])
def test_no_access_log_writes_no_line_anywhere_at_any_log_level(tmp_path: Path, log_level: str) -> None:
    """`serve --no-access-log` at the default --log-level info printed every line anyway, through the
    `dreamseed.access` logger to stderr (on the event loop, a write a request); off means off, while
    the proxy's own diagnostics still come through."""
    sim = start_sim("m", tokens=1)
    policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                              {"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, extra=["--no-access-log", "--log-level", log_level])
    try:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
        ids = [httpx.post(f"{proxy.url}/v1/chat/completions", json=body).headers["x-request-id"] for _ in range(3)]
        bad = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{")  # an error is not logged either
        assert bad.status_code == 400
        time.sleep(0.5)  # the access log writes within 50 ms of a line
        output = proxy.log()  # standard output and standard error
        assert not any(request_id in output for request_id in [*ids, bad.headers["x-request-id"]]), output[-2000:]
        if log_level == "info":
            assert "Application startup complete" in output  # the log itself was on, and read
    finally:
        proxy.stop()
        sim.stop()


def test_an_access_log_buffer_below_one_line_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    for value, says in (("0", "0 must be at least 1"), ("lots", "'lots' is not a whole number")):
        result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "serve", "--port", "0",
                                 "--access-log-buffer", value], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "--access-log-buffer" in result.stderr and says in result.stderr


def test_the_proxys_counters_and_histograms_read_as_prometheus_clients_own() -> None:
    """CounterVec and HistogramVec (plain floats on the request path) must write the page
    prometheus_client's Counter and Histogram write for the same events: cumulative buckets, a
    value equal to a bound counted in that bound's bucket, +Inf, _count and _sum."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from dreamseed.metrics import ProxyMetrics
    from dreamseed.policy import LATENCY_BUCKETS

    ours = ProxyMetrics(lambda: iter(()))
    theirs = CollectorRegistry()
    requests = Counter("dreamseed_requests", ours.requests.documentation, ["rule", "backend", "status"],
                       registry=theirs)
    duration = Histogram("dreamseed_request_duration_seconds", ours.duration.documentation, ["backend"],
                         buckets=LATENCY_BUCKETS, registry=theirs)
    events = [("default", "general", "200", 0.1), ("default", "general", "200", 0.0999),
              ("code", "coder", "200", 0.5), ("code", "coder", "502", 250.0), ("default", "general", "200", 0.0)]
    for rule, backend, status, seconds in events:
        requests.labels(rule, backend, status).inc()
        ours.requests.inc(rule, backend, status)
        duration.labels(backend).observe(seconds)
        ours.duration.observe(ours.duration.cell(backend), seconds)

    def page(registry: CollectorRegistry, names: tuple[str, ...]) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if line.split("{")[0].split(" ")[0] in names and not line.endswith("_created")]

    names = ("dreamseed_requests_total", "dreamseed_request_duration_seconds_bucket",
             "dreamseed_request_duration_seconds_count", "dreamseed_request_duration_seconds_sum")
    expected = page(theirs, names)
    assert 'dreamseed_request_duration_seconds_bucket{backend="general",le="0.1"} 3.0' in expected
    assert sorted(page(ours.registry, names)) == sorted(expected)
