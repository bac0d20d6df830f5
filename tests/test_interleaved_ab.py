"""benchmarks/interleaved.py, the A/B behind benchmarks/README.md's round-by-round figures: it must
start each variant (the proxy as users run it, with N workers, or the bare forwarder), measure
every one against direct in every round, and refuse a variant it cannot read."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support import ROOT

SCRIPT = str(ROOT / "benchmarks" / "interleaved.py")


def test_every_variant_is_measured_in_every_round_and_summarised() -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "two=2", "floor=floor", "--rounds", "2", "--requests", "40", "--concurrency", "4"],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = re.findall(r"^round (\d) (\w+) +added_p95_ms (-?[\d.]+) .*throughput_ratio ([\d.]+)", result.stdout, re.M)
    assert [(r, name) for r, name, *_ in rounds] == [("1", "two"), ("1", "floor"), ("2", "two"), ("2", "floor")]
    assert all(float(ratio) > 0 for *_, ratio in rounds)
    summary = result.stdout.split("medians over the rounds", 1)[1]
    assert re.search(r"^two +added_p95_ms", summary, re.M) and re.search(r"^floor +added_p95_ms", summary, re.M)


@pytest.mark.parametrize(("variant", "message"), [
    ("2", "NAME=SPEC"),
    ("x=two", "variant x=two: SPEC is a worker count"),
    ("x=0", "variant x=0: SPEC is a worker count"),
    ("x=2@/nonexistent", "/nonexistent has no proxy/dreamseed folder"),
])
def test_a_variant_it_cannot_read_is_refused_before_anything_starts(variant: str, message: str) -> None:
    result = subprocess.run([sys.executable, SCRIPT, variant], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
