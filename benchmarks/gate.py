"""Run the benchmark suites and check them against benchmarks/gates.yaml.

    python3 benchmarks/gate.py            short mode (CI): a few minutes, loose thresholds
    python3 benchmarks/gate.py --full     the full suites against the targets themselves
    python3 benchmarks/gate.py --targets  the targets as a Markdown table (benchmarks/README.md quotes it)

Prints a table (measure, value, threshold, pass/fail), writes every result as JSON (default
.benchmarks/gate-<mode>.json), and exits 1 if a gate fails, 2 if the suites or the gate file
are broken.

A timed gate that fails gets one second reading: the benchmarks behind the failed gates run once
more and each failed gate keeps its better reading, shown beside the first in the table. A stall
of a shared machine rarely lands on the same measure twice; a regression in the code fails both
readings. Gates marked `retry: false` (counts that repeat exactly, such as instructions) get none:
a second reading would only repeat the first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


@dataclass
class Outcome:
    measure: str
    what: str
    value: float | None
    threshold: str
    status: str  # pass, FAIL, info, MISSING, skipped
    first: float | None = None  # the first reading, where the gate failed it and was measured again


def load_gates(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    gates = data.get("gates") if isinstance(data, dict) else None
    if not isinstance(gates, list):
        raise SystemExit(f"{path}: expected a top-level `gates:` list")
    for index, gate in enumerate(gates):
        if not isinstance(gate, dict) or ":" not in str(gate.get("measure", "")):
            raise SystemExit(f"{path}: gates[{index}].measure must be '<benchmark>:<key>'")
        for mode in ("short", "full"):
            bound = gate.get(mode)
            if bound is not None and (not isinstance(bound, dict) or not set(bound) <= {"min", "max"} or not bound):
                raise SystemExit(f"{path}: gates[{index}].{mode} must be {{min: N}} and/or {{max: N}}")
        if not isinstance(gate.get("retry", True), bool):
            raise SystemExit(f"{path}: gates[{index}].retry must be true or false")
    return gates


def run_suites(mode: str, output: Path, root: Path, targets: list[str]) -> int:
    """Run pytest on `targets` (the suites' folder, or pytest node ids) into a pytest-benchmark
    JSON. The root directory is fixed, so the node ids in the JSON name the same tests when they
    are run again."""
    env = {**os.environ, "DREAMSEED_BENCH_MODE": mode}
    command = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", f"--rootdir={root}",
               "-W", "ignore", f"--benchmark-json={output}", "--benchmark-columns=median,ops"]
    return subprocess.call(command, env=env, cwd=root)


def read_report(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """A pytest-benchmark JSON as {benchmark name: extra_info} and {benchmark name: pytest node id}."""
    report = json.loads(path.read_text())
    benchmarks = report.get("benchmarks", [])
    return ({b["name"]: b.get("extra_info", {}) for b in benchmarks},
            {b["name"]: b["fullname"] for b in benchmarks if b.get("fullname")})


def to_measure_again(gates: list[dict[str, Any]], outcomes: list[Outcome]) -> list[str]:
    """The measures whose gate failed and may be read a second time."""
    retry = {gate["measure"] for gate in gates if gate.get("retry", True)}
    return [o.measure for o in outcomes if o.status == "FAIL" and o.measure in retry]


def keep_better(first: list[Outcome], second: list[Outcome], measured_again: list[str]) -> list[Outcome]:
    """The first run's outcomes, with each measure read again replaced by its second reading where
    that one passes. A reading that is missing the second time keeps the first (and its FAIL)."""
    again = set(measured_again)
    kept = []
    for one, two in zip(first, second, strict=True):
        if one.measure not in again:
            kept.append(one)
        elif two.status == "pass":
            kept.append(replace(two, first=one.value))
        else:
            kept.append(replace(one, first=one.value))
    return kept


def evaluate(gates: list[dict[str, Any]], results: dict[str, dict[str, Any]], mode: str) -> list[Outcome]:
    outcomes = []
    for gate in gates:
        name, key = gate["measure"].rsplit(":", 1)
        raw = results.get(name, {}).get(key)
        value = float(raw) if isinstance(raw, (int, float)) else None
        bound = gate.get(mode) or {}
        threshold = " and ".join(f"{'>=' if k == 'min' else '<='} {v:g}" for k, v in sorted(bound.items()))
        if (value is None or math.isnan(value)) and not bound:
            status = "skipped"  # a measure this mode does not run (e.g. 100k chunks in short mode)
        elif value is None or math.isnan(value):
            status = "MISSING"
        elif not bound:
            status = "info"
        else:
            ok = value >= bound.get("min", -math.inf) and value <= bound.get("max", math.inf)
            status = "pass" if ok else "FAIL"
        outcomes.append(Outcome(gate["measure"], gate.get("what", ""), value, threshold or "-", status))
    return outcomes


def print_table(outcomes: list[Outcome], mode: str) -> None:
    width = max(len(o.measure) for o in outcomes)
    print(f"\nbenchmark gates ({mode} mode)")
    print(f"{'measure':<{width}}  {'value':>10}  {'threshold':<12}  result")
    for o in outcomes:
        value = "-" if o.value is None else f"{o.value:10.3f}"
        again = ""
        if o.first is not None:
            kept = "the second reading" if o.status == "pass" else "failed twice"
            again = f" ({kept}; the first read {o.first:.3f})"
        print(f"{o.measure:<{width}}  {value:>10}  {o.threshold:<12}  {o.status}{again}")


def bound_text(bound: dict[str, float] | None) -> str:
    if not bound:
        return ""
    return " and ".join(f"{'>=' if key == 'min' else '<='} {value:g}" for key, value in sorted(bound.items(), reverse=True))


def targets_table(gates: list[dict[str, Any]]) -> str:
    """Every gate with a full-mode threshold: the targets, with the looser bound CI checks."""
    rows = ["| measure | what | target (full) | CI (short) |", "|---|---|---|---|"]
    for gate in gates:
        if gate.get("full"):
            rows.append(f"| `{gate['measure']}` | {gate.get('what', '')} | {bound_text(gate['full'])} | "
                        f"{bound_text(gate.get('short')) or '-'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the full suites against the full thresholds")
    parser.add_argument("--gates", type=Path, default=HERE / "gates.yaml")
    parser.add_argument("--suites", type=Path, default=HERE, help="the folder of benchmark suites to run")
    parser.add_argument("--json", type=Path, help="where to write the results (default .benchmarks/gate-MODE.json)")
    parser.add_argument("--results", type=Path, help="check an existing pytest-benchmark JSON instead of running")
    parser.add_argument("--no-retry", action="store_true", help="no second reading for failed timed gates")
    parser.add_argument("--targets", action="store_true", help="print the targets as a Markdown table and exit")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "short"
    gates = load_gates(args.gates)
    if args.targets:
        print(targets_table(gates), end="")
        return 0
    suites = args.suites.resolve()

    source = args.results
    if source is None:
        source = Path(tempfile.mkstemp(prefix="dreamseed-bench-", suffix=".json")[1])
        if run_suites(mode, source, suites.parent, [str(suites)]) != 0:
            print("benchmark suites failed; gates not checked", file=sys.stderr)
            return 2
    results, node_ids = read_report(source)
    outcomes = evaluate(gates, results, mode)

    second_readings: dict[str, dict[str, Any]] = {}
    again = to_measure_again(gates, outcomes) if args.results is None and not args.no_retry else []
    if again:
        tests = sorted({node_ids[measure.rsplit(":", 1)[0]] for measure in again})
        print(f"\n{len(again)} gate(s) failed their first reading; measuring again once: {' '.join(tests)}")
        second = Path(tempfile.mkstemp(prefix="dreamseed-bench-again-", suffix=".json")[1])
        if run_suites(mode, second, suites.parent, tests) != 0:
            print("the second run of the benchmarks failed; gates not checked", file=sys.stderr)
            return 2
        second_results, _ = read_report(second)
        outcomes = keep_better(outcomes, evaluate(gates, second_results, mode), again)
        second_readings = second_results
    print_table(outcomes, mode)

    destination = args.json or HERE.parent / ".benchmarks" / f"gate-{mode}.json"
    destination.parent.mkdir(parents=True, exist_ok=True)
    failed = [o for o in outcomes if o.status in ("FAIL", "MISSING")]
    destination.write_text(json.dumps({"mode": mode, "passed": not failed, "gates": [asdict(o) for o in outcomes],
                                       "benchmarks": results,
                                       "second_readings": second_readings}, indent=2))
    print(f"\nresults written to {destination}")
    if failed:
        print(f"{len(failed)} gate(s) failed: {', '.join(o.measure for o in failed)}", file=sys.stderr)
        return 1
    print("all gates passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
