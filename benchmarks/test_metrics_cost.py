"""What recording one request costs the hot path: metrics, and metrics plus the access log."""

from __future__ import annotations

import pytest

from dreamseed.exchange import Exchange
from dreamseed.logs import AccessLogQueue, set_access_log
from dreamseed.metrics import ProxyMetrics, log_exchange


@pytest.fixture
def metrics() -> ProxyMetrics:
    return ProxyMetrics(lambda: iter(()))


def exchange() -> Exchange:
    e = Exchange("0123456789abcdef0123456789abcdef", "chat", rule="default", backend="general", status=200)
    e.first_byte = e.started + 0.02
    e.upstream_started, e.upstream_done = e.started + 0.001, e.started + 0.02
    e.prompt_tokens, e.completion_tokens = 12, 16
    return e


def test_record_metrics(benchmark, metrics: ProxyMetrics) -> None:  # type: ignore[no-untyped-def]
    e = exchange()
    benchmark(metrics.record, e)
    benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6


def test_record_metrics_and_access_log(benchmark, metrics: ProxyMetrics, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As `serve` logs: the line into the access log's queue, written by its own thread (the
    thread's share of the GIL shows in the end-to-end figures of test_user_config.py)."""
    with open(tmp_path / "access.log", "ab") as destination:
        sink = AccessLogQueue(destination, capacity=1_000_000)
        set_access_log(sink)
        sink.start()
        try:
            e = exchange()

            def both() -> None:
                metrics.record(e)
                log_exchange(e)

            benchmark(both)
            benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6
        finally:
            set_access_log(None)
            sink.stop(timeout=30)
    assert (tmp_path / "access.log").read_text().count('"request_id"') > 0 and sink.dropped == 0
