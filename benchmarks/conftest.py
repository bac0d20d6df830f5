"""Benchmark fixtures: one simulated backend and one proxy in front of it, as real processes.

DREAMSEED_BENCH_MODE=short (CI, the default) or full sets how many requests each measure sends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import MODE, MODEL, BenchStack, start_proxy, start_sim, write_policies


@pytest.fixture(scope="session")
def bench_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchStack]:
    sim = start_sim(MODEL, tokens=16)
    # A generous limit: the proxy must not be what caps concurrency in the overhead runs.
    policies = write_policies(
        tmp_path_factory.mktemp("bench-policies"),
        {"general": {"url": sim.url, "model": MODEL, "context_length": 4096, "max_concurrency": 512,
                     "timeouts": {"connect": 5, "read": 30, "write": 10, "pool": 10}}},
        {"rules": [{"name": "default", "target": "general"}]},
    )
    # The access log would be piped into this process and compete with the load generator;
    # its cost is measured on its own in test_metrics_cost.py.
    proxy = start_proxy(policies, extra=["--no-access-log"])
    yield BenchStack(sim, proxy, MODE)
    proxy.stop()
    sim.stop()
