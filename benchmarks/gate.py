"""Run the benchmark suites and check them against benchmarks/gates.yaml.

    python3 benchmarks/gate.py            short mode (CI): a minute or so, loose thresholds
    python3 benchmarks/gate.py --full     the full suites against the targets themselves

Prints a table (measure, value, threshold, pass/fail), writes every result as JSON (default
.benchmarks/gate-<mode>.json), and exits 1 if a gate fails, 2 if the suites or the gate file
are broken.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
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
    return gates


def run_suites(mode: str, output: Path) -> int:
    env = {**os.environ, "DREAMSEED_BENCH_MODE": mode}
    command = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider", "-W", "ignore",
               f"--benchmark-json={output}", "--benchmark-columns=median,ops"]
    return subprocess.call(command, env=env, cwd=HERE.parent)


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
        print(f"{o.measure:<{width}}  {value:>10}  {o.threshold:<12}  {o.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the full suites against the full thresholds")
    parser.add_argument("--gates", type=Path, default=HERE / "gates.yaml")
    parser.add_argument("--json", type=Path, help="where to write the results (default .benchmarks/gate-MODE.json)")
    parser.add_argument("--results", type=Path, help="check an existing pytest-benchmark JSON instead of running")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "short"
    gates = load_gates(args.gates)

    source = args.results
    if source is None:
        source = Path(tempfile.mkstemp(prefix="dreamseed-bench-", suffix=".json")[1])
        if run_suites(mode, source) != 0:
            print("benchmark suites failed; gates not checked", file=sys.stderr)
            return 2
    report = json.loads(source.read_text())
    results = {b["name"]: b.get("extra_info", {}) for b in report.get("benchmarks", [])}
    outcomes = evaluate(gates, results, mode)
    print_table(outcomes, mode)

    destination = args.json or HERE.parent / ".benchmarks" / f"gate-{mode}.json"
    destination.parent.mkdir(parents=True, exist_ok=True)
    failed = [o for o in outcomes if o.status in ("FAIL", "MISSING")]
    destination.write_text(json.dumps({"mode": mode, "passed": not failed, "gates": [asdict(o) for o in outcomes],
                                       "benchmarks": results}, indent=2))
    print(f"\nresults written to {destination}")
    if failed:
        print(f"{len(failed)} gate(s) failed: {', '.join(o.measure for o in failed)}", file=sys.stderr)
        return 1
    print("all gates passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
