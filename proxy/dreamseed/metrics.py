"""Prometheus metrics and the JSON access log: one record per request, written when it ends.

Names follow Prometheus conventions (`dreamseed_` prefix, `_seconds`, `_total`); the README maps
them to OpenTelemetry's GenAI conventions and to vLLM's `vllm:` metrics. Histograms have buckets
at exactly 0.1 s and 0.5 s, the seed's P95 targets for 7B and 70B backends, so SLO queries can
use `le="0.1"` and `le="0.5"`.

The hot path costs a few microseconds: label children are looked up once and cached, and
everything that is a state rather than an event (in-flight and queued requests, circuits, the
policy in force) is read from the running objects only when Prometheus scrapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .logs import access_log_sink
from .policy import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .backends import BackendState

disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client; no *_created series: they double the series count for nothing here

# Retrieval has a budget of a few hundred milliseconds; resolve the 20 ms benchmark target too.
RAG_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

NONE = "none"  # label value when a request ended before a rule or backend was chosen

access_log = logging.getLogger("dreamseed.access")


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


def usage_of(body: bytes) -> tuple[int, int] | None:
    """Token counts from an OpenAI response (or a stream chunk) that carries `usage`."""
    try:
        usage = msgspec.json.decode(body, type=_WithUsage).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None


@dataclass(slots=True)
class Exchange:
    """What happened to one request, filled in as it goes."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    stream: bool = False
    rule: str = NONE
    backend: str = NONE
    fallbacks: list[str] = field(default_factory=list)
    status: int = 0
    error: str | None = None  # an error code: the proxy's, or a mid-stream failure
    first_byte: float | None = None
    upstream_started: float | None = None
    upstream_done: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt: str | None = None  # only with --log-prompts
    rag: str | None = None  # retrieval outcome: hits, empty, degraded (None: retrieval off)
    rag_hits: int | None = None
    rag_seconds: float | None = None
    on_finish: Callable[[Exchange], None] | None = None

    def finish(self) -> None:
        if self.on_finish is not None:
            callback, self.on_finish = self.on_finish, None
            callback(self)


class ProxyMetrics:
    def __init__(self, state: Callable[[], Iterator[Metric]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dreamseed_requests", "Requests answered, by routing rule, backend and HTTP status "
                                "(a stream that broke off counts as 502, or 504 if the backend stalled).",
                                ["rule", "backend", "status"], registry=r)
        self.duration = Histogram("dreamseed_request_duration_seconds", "Time from request to last response byte.",
                                  ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dreamseed_time_to_first_token_seconds",
                              "Time to the first response byte: the first token of a stream, the whole answer "
                              "otherwise (successful requests only).", ["backend"], buckets=LATENCY_BUCKETS,
                              registry=r)
        self.upstream = Histogram("dreamseed_upstream_duration_seconds",
                                  "Time the backend took, from sending it the request to its last byte.",
                                  ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dreamseed_prompt_tokens", "Prompt tokens, from the backends' usage reports.",
                                     ["backend"], registry=r)
        self.completion_tokens = Counter("dreamseed_completion_tokens",
                                         "Completion tokens, from the backends' usage reports.", ["backend"],
                                         registry=r)
        self.fallbacks = Counter("dreamseed_fallbacks", "Backends skipped along a rule's fallback chain, with why.",
                                 ["rule", "backend", "reason"], registry=r)
        self.policy_reloads = Counter("dreamseed_policy_reloads", "Policy reload attempts, by result.", ["result"],
                                      registry=r)
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)  # exported at 0 from the start, so rate() works at once
        self.rag_requests = Counter("dreamseed_rag_requests", "Requests with retrieval on, by outcome: hits (context "
                                    "added), empty (nothing relevant found), degraded (store or embedder failed or "
                                    "ran out of time; answered without context).", ["rule", "outcome"], registry=r)
        self.rag_hits = Counter("dreamseed_rag_hits", "Retrieved chunks put into prompts.", ["rule"], registry=r)
        self.rag_duration = Histogram("dreamseed_rag_retrieval_seconds",
                                      "Time spent retrieving context (embedding + SQL), degraded attempts included.",
                                      ["rule"], buckets=RAG_BUCKETS, registry=r)
        self.scaler_events = Counter("dreamseed_scaler_events", "On-demand backend starts, stops, failed starts and "
                                     "refused starts, with the reason (keyword, volume, admin, idle, budget, error).",
                                     ["backend", "event", "reason"], registry=r)
        r.register(_StateCollector(state))
        self._children: dict[tuple[str, ...], Any] = {}
        # Every request's series, looked up once per (rule, backend, status) instead of one by one.
        self._answers: dict[tuple[str, str, int], tuple[Any, Any, Any, Any, Any, Any]] = {}

    def across_workers(self, directory: Path, state: Iterable[Metric]) -> CollectorRegistry:
        """A registry for one /metrics answer with --workers: every worker's counters and histograms
        (prometheus_client's multiprocess files, summed) and the given state families."""
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        families = list(state)
        registry.register(_StateCollector(lambda: iter(families)))
        return registry

    def count_scaler_event(self, backend: str, event: str, reason: str) -> None:
        self.scaler_events.labels(backend, event, reason).inc()

    def count_reload(self, ok: bool) -> None:
        self.policy_reloads.labels("success" if ok else "failure").inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _answer_series(self, rule: str, backend: str, status: int) -> tuple[Any, Any, Any, Any, Any, Any]:
        key = (rule, backend, status)
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = (
                self._child(self.requests, rule, backend, str(status)), self._child(self.duration, backend),
                self._child(self.ttft, backend), self._child(self.upstream, backend),
                self._child(self.prompt_tokens, backend), self._child(self.completion_tokens, backend))
        return found

    def record(self, exchange: Exchange) -> None:
        now = time.perf_counter()
        requests, duration, ttft, upstream, prompt_tokens, completion_tokens = self._answer_series(
            exchange.rule, exchange.backend, exchange.status)
        requests.inc()
        duration.observe(now - exchange.started)
        if exchange.status < 400 and exchange.first_byte is not None:
            ttft.observe(exchange.first_byte - exchange.started)
        if exchange.upstream_started is not None and exchange.upstream_done is not None:
            upstream.observe(exchange.upstream_done - exchange.upstream_started)
        if exchange.prompt_tokens:
            prompt_tokens.inc(exchange.prompt_tokens)
        if exchange.completion_tokens:
            completion_tokens.inc(exchange.completion_tokens)
        if exchange.rag is not None:
            self._child(self.rag_requests, exchange.rule, exchange.rag).inc()
            if exchange.rag_hits:
                self._child(self.rag_hits, exchange.rule).inc(exchange.rag_hits)
            if exchange.rag_seconds is not None:
                self._child(self.rag_duration, exchange.rule).observe(exchange.rag_seconds)
        for skipped in exchange.fallbacks:
            name, _, reason = skipped.partition(":")
            self._child(self.fallbacks, exchange.rule, name, reason).inc()


class _StateCollector(Collector):
    """Gauges read from the running proxy at scrape time."""

    def __init__(self, state: Callable[[], Iterator[Metric]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        yield from self._state()

    def describe(self) -> Iterator[Metric]:
        return iter(())


def state_metrics(backends: Mapping[str, BackendState], policy_hash: str) -> Iterator[Metric]:
    """The families _StateCollector exports, from the same view /admin/backends shows."""
    in_flight = GaugeMetricFamily("dreamseed_in_flight_requests", "Requests holding a connection to the backend.",
                                  labels=["backend"])
    queued = GaugeMetricFamily("dreamseed_queued_requests", "Requests waiting for a free slot.", labels=["backend"])
    up = GaugeMetricFamily("dreamseed_backend_up", "1 if the health checks find the backend up, else 0.",
                           labels=["backend", "on_demand"])
    circuit = GaugeMetricFamily("dreamseed_backend_circuit_state", "1 for the circuit's current state.",
                                labels=["backend", "state"])
    for name, view in backends.items():
        in_flight.add_metric([name], view.in_flight)
        queued.add_metric([name], view.queued)
        up.add_metric([name, str(view.on_demand).lower()], 1.0 if view.state == "up" else 0.0)
        for state in ("closed", "open", "half_open"):
            circuit.add_metric([name, state], 1.0 if view.circuit == state else 0.0)
    scaler = GaugeMetricFamily("dreamseed_scaler_state", "1 for an on-demand backend's state: stopped, starting, "
                               "ready, draining, failed.", labels=["backend", "state"])
    for name, view in backends.items():
        if view.scaler is not None:
            for state in ("stopped", "starting", "ready", "draining", "failed"):
                scaler.add_metric([name, state], 1.0 if view.scaler["state"] == state else 0.0)
    info = GaugeMetricFamily("dreamseed_policy_info", "The policy in force (1), labelled with its SHA-256.",
                             labels=["policy_hash"])
    info.add_metric([policy_hash], 1.0)
    yield from (in_flight, queued, up, circuit, scaler, info)
    yield from access_log_metrics()


def access_log_metrics() -> Iterator[Metric]:
    """The access log's queue (logs.AccessLogQueue): lines waiting for the writer thread, and lines
    dropped because the destination did not keep up."""
    sink = access_log_sink()
    if sink is None:
        return
    dropped = CounterMetricFamily("dreamseed_access_log_dropped", "Access log lines dropped because their "
                                  "destination (standard output or --access-log-file) did not keep up.")
    dropped.add_metric([], sink.dropped)
    waiting = GaugeMetricFamily("dreamseed_access_log_queued", "Access log lines waiting to be written.")
    waiting.add_metric([], sink.lines.qsize())
    yield from (dropped, waiting)


def log_exchange(exchange: Exchange) -> None:
    """The exchange's access log line: to the access log's queue (logs.AccessLogQueue) when
    `serve` set one up, else through the `dreamseed.access` logger if something listens there."""
    sink = access_log_sink()
    if sink is None and not access_log.isEnabledFor(logging.INFO):
        return
    now = time.perf_counter()
    entry: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": exchange.request_id,
        "endpoint": exchange.endpoint,
        "stream": exchange.stream,
        "rule": exchange.rule,
        "backend": exchange.backend,
        "fallback": exchange.fallbacks or None,
        "status": exchange.status,
        "error": exchange.error,
        "duration_ms": round((now - exchange.started) * 1e3, 2),
        "ttft_ms": round((exchange.first_byte - exchange.started) * 1e3, 2) if exchange.first_byte else None,
        "prompt_tokens": exchange.prompt_tokens,
        "completion_tokens": exchange.completion_tokens,
        "rag": exchange.rag,
        "rag_hits": exchange.rag_hits,
        "rag_ms": round(exchange.rag_seconds * 1e3, 2) if exchange.rag_seconds is not None else None,
    }
    if exchange.prompt is not None:
        entry["prompt"] = exchange.prompt
    line = msgspec.json.encode(entry)
    if sink is not None:
        sink.put(line + b"\n")  # no LogRecord on the request path: see AccessLogQueue
    else:
        access_log.info(line.decode())
