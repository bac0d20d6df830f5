"""The relay's machine instructions per request, counted by valgrind's callgrind: the one measure
of the proxy's own cost that the machine's noise cannot move.

On the shared 2-core machines the benchmarks run on, CPU time per request moves by 10-20% between
runs of one commit, end to end and even in process (benchmarks/README.md, items 6 and 8), more
than most changes to the request path are worth. The instructions the relay executes for a request
do not depend on what else the machine runs: counted over 300 requests they repeat to about 0.2%.
relay_instructions.py runs each variant in process (test_relay_in_process.py's harness, against
the simulated backend over the real connection pool) under callgrind, which counts only the
measured requests on the event loop's thread. What is not counted: the kernel's side of the
socket calls, and the server around the app (uvicorn); end-to-end CPU (test_user_config.py)
covers those.

Short mode counts the user configuration and the floor (bare_forwarder.py's app); full mode also
turns one feature off at a time, the in-process version of test_user_config's table. Skipped
where valgrind is not installed (.ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import BenchStack

HERE = Path(__file__).resolve().parent
COUNT = 300  # requests counted per variant: enough for the per-request figure to repeat to 0.2%
STREAMS = 100  # streams counted per variant, 20 events each

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
                                reason="valgrind (callgrind) is not installed")


def start(backend: str, variant: str, output: Path, stream: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--toggle-collect=functools_reduce",
         f"--callgrind-out-file={output}", sys.executable, str(HERE / "relay_instructions.py"), backend, variant,
         str(STREAMS if stream else COUNT), *(["--stream"] if stream else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)


def finish(process: subprocess.Popen[str], variant: str, stream: bool = False) -> tuple[float, float]:
    """Switch the instrumentation on once the variant is warm, let it run, and return its
    instructions per request and, for streams, the events each brought."""
    assert process.stdout is not None and process.stdin is not None
    ready = process.stdout.readline()
    if ready.strip() != "READY":
        _, err = process.communicate(timeout=60)
        raise AssertionError(f"{variant}: did not start: {ready!r} {err[-2000:]}")
    subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True, timeout=60)
    out, err = process.communicate("go\n", timeout=600)
    collected = re.findall(r"Collected : (\d+)", err)
    events = re.findall(r"EVENTS ([0-9.]+)", out)
    assert process.returncode == 0 and collected, f"{variant}: {err[-2000:]}"
    instructions = int(collected[-1])
    # Zero would mean callgrind never entered functools.reduce (a Python built without symbols).
    assert instructions > 0, f"{variant}: callgrind collected nothing: {err[-2000:]}"
    if stream:
        assert events, out
        return instructions / STREAMS, float(events[-1])
    return instructions / COUNT, 1.0


def test_relay_instructions(benchmark, bench_stack: BenchStack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = bench_stack.sim
    sim.configure(ttft=0.0, token_delay=0.0, tokens=4)
    variants = ["user", "floor"] if bench_stack.mode == "short" else \
        ["user", "floor", "no_keys", "no_access_log", "one_rule"]

    def measure() -> dict[str, Any]:
        counts: dict[str, float] = {}
        for pair in (variants[i:i + 2] for i in range(0, len(variants), 2)):  # two at a time: two cores
            started = {v: start(sim.url, v, tmp_path / f"callgrind.{v}") for v in pair}
            for variant, process in started.items():
                counts[variant] = finish(process, variant)[0]
        out: dict[str, Any] = {f"{v}_kinstructions": counts[v] / 1e3 for v in variants}
        out["features_kinstructions"] = (counts["user"] - counts["floor"]) / 1e3
        out["user_over_floor"] = counts["user"] / counts["floor"]
        for variant, feature in (("no_keys", "keys"), ("no_access_log", "access_log"), ("one_rule", "shipped_rules")):
            if variant in counts:
                out[f"{feature}_kinstructions"] = (counts["user"] - counts[variant]) / 1e3
        # Streams of 20 tokens, 5 ms apart (so each arrives as an event of its own even at
        # valgrind's pace): what a stream costs, and over the non-streamed request, what its events do.
        sim.configure(ttft=0.0, token_delay=0.005, tokens=20)
        started = {v: start(sim.url, v, tmp_path / f"callgrind.stream.{v}", stream=True) for v in ("user", "floor")}
        streamed = {v: finish(p, v, stream=True) for v, p in started.items()}
        for variant, (instructions, events) in streamed.items():
            out[f"stream_{variant}_kinstructions"] = instructions / 1e3
            out[f"stream_{variant}_events"] = events
            out[f"stream_{variant}_kinstructions_per_event"] = (instructions - counts[variant]) / events / 1e3
        out["stream_user_over_floor"] = streamed["user"][0] / streamed["floor"][0]
        return out

    try:
        result = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        sim.configure(ttft=0.02, token_delay=0.0, tokens=16)  # the other suites' shape
    benchmark.extra_info.update(result)
