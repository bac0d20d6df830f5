"""Prometheus metrics and the JSON access log: one record per request, written when it ends.

Names follow Prometheus conventions (`dreamseed_` prefix, `_seconds`, `_total`); the README maps
them to OpenTelemetry's GenAI conventions and to vLLM's `vllm:` metrics. Histograms have buckets
at exactly 0.1 s and 0.5 s, the seed's P95 targets for 7B and 70B backends, so SLO queries can
use `le="0.1"` and `le="0.5"`.

The hot path costs about a microsecond: counts are plain floats (CounterVec, HistogramVec), a
request's cells are looked up once per (rule, backend, status) and cached, and everything that is
a state rather than an event (in-flight and queued requests, circuits, the policy in force) is
read from the running objects only when Prometheus scrapes. With `serve --workers` each worker
shares a snapshot of its counts every second and before it answers a scrape
(workers.SharedFiles), and whichever worker answers adds them up.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .exchange import Exchange
from .logs import access_log_sink, access_logger
from .policy import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .states import BackendState

# Retrieval has a budget of a few hundred milliseconds; the low buckets resolve its benchmark target.
RAG_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

class CounterVec:
    """A counter family kept as plain floats, one list cell per label set.

    Why not prometheus_client's Counter and Histogram on the request path: each of their updates
    takes a lock, and in multiprocess mode also calls os.getpid(), a system call, to notice a fork
    (docs/decisions/plain-float-metrics.md). The updates happen on the event loop's thread only,
    so nothing needs a lock; prometheus_client still writes the page (the families below are its
    custom-collector API)."""

    width = 1  # floats in a cell

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.cells: dict[tuple[str, ...], list[float]] = {}

    def cell(self, *labels: str) -> list[float]:
        found = self.cells.get(labels)
        if found is None:
            found = self.cells[labels] = [0.0] * self.width
        return found

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.cell(*labels)[0] += amount

    def family(self, cells: Mapping[tuple[str, ...], list[float]]) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, cell in cells.items():
            family.add_metric(list(labels), cell[0])
        return family


class HistogramVec(CounterVec):
    """A histogram family: a cell holds each bucket's own count (the last bucket is +Inf), then
    the sum of the observed values."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labels)
        self.bounds = tuple(sorted(buckets))
        self.width = len(self.bounds) + 2
        # The le labels prometheus_client's own Histogram writes (untyped in prometheus-client).
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]

    def observe(self, cell: list[float], value: float) -> None:
        cell[bisect_left(self.bounds, value)] += 1  # buckets are "less than or equal": the first bound >= value
        cell[-1] += value

    def family(self, cells: Mapping[tuple[str, ...], list[float]]) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, cell in cells.items():
            cumulative = list(accumulate(cell[:-1]))
            family.add_metric(list(labels), buckets=list(zip(self._le, cumulative, strict=True)), sum_value=cell[-1])
        return family


Counts = dict[str, list[tuple[list[str], list[float]]]]  # a process's counts as plain data: name -> [(labels, cell)]


class ProxyMetrics:
    def __init__(self, state: Callable[[], Iterator[Metric]]) -> None:
        self.requests = CounterVec("dreamseed_requests", "Requests answered, by routing rule, backend and HTTP "
                                   "status (a stream that broke off counts as 502, or 504 if the backend stalled).",
                                   ["rule", "backend", "status"])
        self.duration = HistogramVec("dreamseed_request_duration_seconds", "Time from request to last response byte.",
                                     ["backend"], LATENCY_BUCKETS)
        self.ttft = HistogramVec("dreamseed_time_to_first_token_seconds",
                                 "Time to the first response byte: the first token of a stream, the whole answer "
                                 "otherwise (successful requests only).", ["backend"], LATENCY_BUCKETS)
        self.upstream = HistogramVec("dreamseed_upstream_duration_seconds",
                                     "Time the backend took, from sending it the request to its last byte.",
                                     ["backend"], LATENCY_BUCKETS)
        self.prompt_tokens = CounterVec("dreamseed_prompt_tokens", "Prompt tokens, from the backends' usage reports.",
                                        ["backend"])
        self.completion_tokens = CounterVec("dreamseed_completion_tokens",
                                            "Completion tokens, from the backends' usage reports.", ["backend"])
        self.fallbacks = CounterVec("dreamseed_fallbacks", "Backends skipped along a rule's fallback chain, with why.",
                                    ["rule", "backend", "reason"])
        self.policy_reloads = CounterVec("dreamseed_policy_reloads", "Policy reload attempts, by result.", ["result"])
        for result in ("success", "failure"):
            self.policy_reloads.cell(result)  # exported at 0 from the start, so rate() works at once
        self.rag_requests = CounterVec("dreamseed_rag_requests", "Requests with retrieval on, by outcome: hits "
                                       "(context added), empty (nothing relevant found), degraded (store or embedder "
                                       "failed or ran out of time; answered without context).", ["rule", "outcome"])
        self.rag_hits = CounterVec("dreamseed_rag_hits", "Retrieved chunks put into prompts.", ["rule"])
        self.rag_duration = HistogramVec("dreamseed_rag_retrieval_seconds",
                                         "Time spent retrieving context (embedding + SQL), degraded attempts "
                                         "included.", ["rule"], RAG_BUCKETS)
        self.scaler_events = CounterVec("dreamseed_scaler_events", "On-demand backend starts, stops, failed starts "
                                        "and refused starts, with the reason (keyword, volume, admin, idle, budget, "
                                        "error).", ["backend", "event", "reason"])
        self.families: tuple[CounterVec, ...] = (
            self.requests, self.duration, self.ttft, self.upstream, self.prompt_tokens, self.completion_tokens,
            self.fallbacks, self.policy_reloads, self.rag_requests, self.rag_hits, self.rag_duration,
            self.scaler_events)
        self._state = state
        # Every request's cells, looked up once per (rule, backend, status) instead of one by one.
        self._answers: dict[tuple[str, str, int], tuple[list[float], ...]] = {}

    @property
    def registry(self) -> CollectorRegistry:
        """This process's page: its counts and the state families, read now (on the event loop)."""
        return self.registry_of([self.snapshot()], list(self._state()))

    def registry_of(self, counts: Iterable[Counts], state: Iterable[Metric]) -> CollectorRegistry:
        """A page from plain data only: the `counts` (snapshots: this process's, and with --workers
        every worker's latest) added up, and the given state families. It reads no live cell, so
        it may be built off the event loop."""
        counts = list(counts)
        families = [vec.family(_summed(vec.name, counts)) for vec in self.families]
        families += state
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families))
        return registry

    def snapshot(self) -> Counts:
        """This process's counts as plain data, for the other workers' pages (workers.SharedFiles)."""
        return {vec.name: [(list(labels), list(cell)) for labels, cell in vec.cells.items()] for vec in self.families}

    def count_scaler_event(self, backend: str, event: str, reason: str) -> None:
        self.scaler_events.inc(backend, event, reason)

    def count_reload(self, ok: bool) -> None:
        self.policy_reloads.inc("success" if ok else "failure")

    def _answer_cells(self, rule: str, backend: str, status: int) -> tuple[list[float], ...]:
        key = (rule, backend, status)
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = (
                self.requests.cell(rule, backend, str(status)), self.duration.cell(backend), self.ttft.cell(backend),
                self.upstream.cell(backend), self.prompt_tokens.cell(backend), self.completion_tokens.cell(backend))
        return found

    def record(self, exchange: Exchange) -> None:
        now = time.perf_counter()
        requests, duration, ttft, upstream, prompt_tokens, completion_tokens = self._answer_cells(
            exchange.rule, exchange.backend, exchange.status)
        requests[0] += 1
        self.duration.observe(duration, now - exchange.started)
        if exchange.status < 400 and exchange.first_byte is not None:
            self.ttft.observe(ttft, exchange.first_byte - exchange.started)
        if exchange.upstream_started is not None and exchange.upstream_done is not None:
            self.upstream.observe(upstream, exchange.upstream_done - exchange.upstream_started)
        if exchange.prompt_tokens:
            prompt_tokens[0] += exchange.prompt_tokens
        if exchange.completion_tokens:
            completion_tokens[0] += exchange.completion_tokens
        if exchange.rag is not None:
            self.rag_requests.inc(exchange.rule, exchange.rag)
            if exchange.rag_hits:
                self.rag_hits.inc(exchange.rule, amount=exchange.rag_hits)
            if exchange.rag_seconds is not None:
                self.rag_duration.observe(self.rag_duration.cell(exchange.rule), exchange.rag_seconds)
        for skipped in exchange.fallbacks:
            name, _, reason = skipped.partition(":")
            self.fallbacks.inc(exchange.rule, name, reason)


def _summed(name: str, counts: Iterable[Counts]) -> dict[tuple[str, ...], list[float]]:
    """One family's cells in every snapshot of `counts`, added up."""
    total: dict[tuple[str, ...], list[float]] = {}
    for snapshot in counts:
        for labels, cell in snapshot.get(name, ()):
            key = tuple(labels)
            mine = total.get(key)
            total[key] = list(cell) if mine is None else [a + b for a, b in zip(mine, cell, strict=True)]
    return total


class _Families(Collector):
    """The families of one page, made before prometheus_client writes it."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def state_metrics(backends: Mapping[str, BackendState], policy_hash: str) -> Iterator[Metric]:
    """The state families of a page, from the same view /admin/backends shows."""
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
    replica_in_flight = GaugeMetricFamily(
        "dreamseed_replica_in_flight_requests", "Requests holding a connection to one replica of a backend that has "
        "several.", labels=["backend", "replica"])
    replica_queued = GaugeMetricFamily("dreamseed_replica_queued_requests", "Requests waiting for a free slot of "
                                       "one replica.", labels=["backend", "replica"])
    replica_up = GaugeMetricFamily("dreamseed_replica_up", "1 if the health checks find the replica up, else 0.",
                                   labels=["backend", "replica"])
    affinity = CounterMetricFamily("dreamseed_replica_affinity", "Requests sent to a replica by prefix affinity: "
                                   "outcome hit (the replica their conversation start maps to) or spill (the next one, "
                                   "the first being over its load bound).", labels=["backend", "replica", "outcome"])
    for name, view in backends.items():
        for replica in view.replicas or ():
            replica_in_flight.add_metric([name, replica.replica], replica.in_flight)
            replica_queued.add_metric([name, replica.replica], replica.queued)
            replica_up.add_metric([name, replica.replica], 1.0 if replica.state == "up" else 0.0)
            affinity.add_metric([name, replica.replica, "hit"], replica.affinity_hits)
            affinity.add_metric([name, replica.replica, "spill"], replica.affinity_spills)
    yield from (replica_in_flight, replica_queued, replica_up, affinity)
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
    waiting.add_metric([], sink.queued)
    yield from (dropped, waiting)


def _ms(seconds: float) -> float:
    """Milliseconds to two decimals, half up. round(x, 2) formats the float as a decimal string
    to round it correctly, more than a log line needs."""
    return int(seconds * 1e5 + 0.5) / 100


class AccessLogLine(msgspec.Struct):
    """One access log line, its keys in this order (docs/operations.md). A Struct rather than a
    dict: msgspec writes its keys from the class, where a dict's sixteen are stored and encoded
    again for every request (docs/decisions/structs-on-the-request-path.md)."""

    ts: float  # Unix time, milliseconds as decimals
    request_id: str
    endpoint: str
    stream: bool
    rule: str
    backend: str
    fallback: list[str] | None
    status: int
    error: str | None
    duration_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    rag: str | None
    rag_hits: int | None
    rag_ms: float | None
    prompt: str | msgspec.UnsetType = msgspec.UNSET  # only with --log-prompts; no key otherwise


def log_exchange(exchange: Exchange) -> None:
    """The exchange's access log line: to the access log's queue (logs.AccessLogQueue) when
    `serve` set one up, else through the `dreamseed.access` logger if something listens there."""
    sink = access_log_sink()
    if sink is None and not access_logger.isEnabledFor(logging.INFO):
        return
    now = time.perf_counter()
    # Positional, in the fields' order: msgspec matches keyword arguments to fields by name, which
    # costs more than the dict did; tests/test_logs_in_process.py checks every field.
    entry = AccessLogLine(
        int(time.time() * 1e3 + 0.5) / 1e3,  # ts
        exchange.request_id,
        exchange.endpoint,
        exchange.stream,
        exchange.rule,
        exchange.backend,
        exchange.fallbacks or None,
        exchange.status,
        exchange.error,
        _ms(now - exchange.started),  # duration_ms
        _ms(exchange.first_byte - exchange.started) if exchange.first_byte else None,  # ttft_ms
        exchange.prompt_tokens,
        exchange.completion_tokens,
        exchange.rag,
        exchange.rag_hits,
        _ms(exchange.rag_seconds) if exchange.rag_seconds is not None else None,  # rag_ms
    )
    if exchange.prompt is not None:
        entry.prompt = exchange.prompt
    line = msgspec.json.encode(entry)
    if sink is not None:
        sink.put(line + b"\n")  # no LogRecord on the request path: see AccessLogQueue
    else:
        access_logger.info(line.decode())
