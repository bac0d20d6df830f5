"""Benchmark fixtures: one simulated backend and one proxy in front of it, as real processes.

DREAMSEED_BENCH_MODE=short (CI, the default) or full sets how many requests each measure sends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/support.py starts the processes
sys.path.insert(0, str(HERE))

from support import Process, Sim, start_proxy, start_sim, write_policies  # noqa: E402

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
