"""What recording one request costs the hot path: metrics, and metrics plus the access log."""

from __future__ import annotations

import logging

import pytest

from dreamseed.metrics import Exchange, ProxyMetrics, log_exchange


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
    access = logging.getLogger("dreamseed.access")
    handler = logging.FileHandler(tmp_path / "access.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    try:
        e = exchange()

        def both() -> None:
            metrics.record(e)
            log_exchange(e)

        benchmark(both)
        benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6
    finally:
        access.removeHandler(handler)
        handler.close()
    assert (tmp_path / "access.log").read_text().count('"request_id"') > 0
