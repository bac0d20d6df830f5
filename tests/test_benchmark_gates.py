"""benchmarks/gates.yaml is read by CI after the tests: a file it cannot parse, or a gate naming a
benchmark that does not exist, would fail CI only at its very end (or gate nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from support import ROOT


def test_every_gate_parses_and_names_an_existing_benchmark() -> None:
    from gate import load_gates

    gates = load_gates(ROOT / "benchmarks" / "gates.yaml")
    sources = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "benchmarks").glob("test_*.py"))
    for gate in gates:
        name = gate["measure"].split(":", 1)[0].split("[", 1)[0]
        assert re.search(rf"def {re.escape(name)}\(", sources), f"{gate['measure']}: no benchmark named {name}"


# A suite of four benchmarks whose readings a file decides: each run of a test appends its reading
# to a log, so the test sees how often each benchmark ran and what it reported.
SUITE = '''
import json, pathlib, pytest
HERE = pathlib.Path(__file__).parent
READINGS = json.loads((HERE / "readings.json").read_text())


def reading(name, benchmark):
    if name not in READINGS:
        pytest.skip("not in this suite")
    runs = HERE / f"runs-{name}"
    count = len(runs.read_text().split()) if runs.exists() else 0
    values = READINGS[name]
    value = values[min(count, len(values) - 1)]
    with runs.open("a") as log:
        log.write(f"{value}\\n")
    benchmark.extra_info["ms"] = value
    benchmark.pedantic(lambda: None, rounds=1)


def test_stalled(benchmark):
    reading("stalled", benchmark)


def test_regressed(benchmark):
    reading("regressed", benchmark)


def test_counted(benchmark):
    reading("counted", benchmark)


def test_steady(benchmark):
    reading("steady", benchmark)
'''


def run_gate(tmp_path: Path, readings: dict[str, list[float]], gates: list[dict[str, object]],
             *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object], dict[str, list[float]]]:
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "test_suite.py").write_text(SUITE, encoding="utf-8")
    (suites / "readings.json").write_text(json.dumps(readings), encoding="utf-8")
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump({"gates": gates}), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gate.py"), "--gates", str(tmp_path / "gates.yaml"),
         "--suites", str(suites), "--json", str(tmp_path / "gate.json"), *extra],
        capture_output=True, text=True, timeout=120)
    runs = {path.name.removeprefix("runs-"): [float(v) for v in path.read_text().split()]
            for path in suites.glob("runs-*")}
    report = json.loads((tmp_path / "gate.json").read_text()) if (tmp_path / "gate.json").exists() else {}
    return result, report, runs


def gate(name: str, retry: bool = True) -> dict[str, object]:
    return {"measure": f"test_{name}:ms", "short": {"max": 10}, **({} if retry else {"retry": False})}


def test_a_failed_timed_gate_is_measured_once_more_and_keeps_its_better_reading(tmp_path: Path) -> None:
    result, report, runs = run_gate(tmp_path, {"stalled": [50, 1], "steady": [1]}, [gate("stalled"), gate("steady")])
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the benchmark behind the failed gate ran again; the passing one ran once.
    assert runs == {"stalled": [50, 1], "steady": [1]}
    kept = {g["measure"]: g for g in report["gates"]}
    assert kept["test_stalled:ms"]["status"] == "pass" and kept["test_stalled:ms"]["value"] == 1
    assert kept["test_stalled:ms"]["first"] == 50 and kept["test_steady:ms"]["first"] is None
    assert "the first read 50.000" in result.stdout


def test_a_gate_that_fails_both_readings_fails_and_a_count_is_read_once(tmp_path: Path) -> None:
    readings = {"stalled": [50, 1], "regressed": [50, 40], "counted": [50, 1], "steady": [1]}
    gates = [gate("stalled"), gate("regressed"), gate("counted", retry=False), gate("steady")]
    result, report, runs = run_gate(tmp_path, readings, gates)
    assert result.returncode == 1, result.stdout + result.stderr
    # The regressed and the stalled benchmarks ran again, the count (retry: false) did not.
    assert runs == {"stalled": [50, 1], "regressed": [50, 40], "counted": [50], "steady": [1]}
    status = {g["measure"]: (g["status"], g["value"]) for g in report["gates"]}
    # Of two failing readings the first is kept: the table never shows a retry as better than it was.
    assert status == {"test_stalled:ms": ("pass", 1), "test_regressed:ms": ("FAIL", 50),
                      "test_counted:ms": ("FAIL", 50), "test_steady:ms": ("pass", 1)}
    assert "failed twice; the first read 50.000" in result.stdout
    assert "2 gate(s) failed: test_regressed:ms, test_counted:ms" in result.stderr


def test_no_second_reading_when_asked_not_to(tmp_path: Path) -> None:
    result, report, runs = run_gate(tmp_path, {"stalled": [50, 1]}, [gate("stalled")], "--no-retry")
    assert result.returncode == 1 and runs == {"stalled": [50]}
    assert report["gates"][0]["status"] == "FAIL"


def test_the_readmes_targets_are_the_gates_files() -> None:
    """One list of targets: benchmarks/README.md quotes gates.yaml's, generated, never restated."""
    from gate import load_gates, targets_table

    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    quoted = readme.split("<!-- targets: generated -->\n", 1)[1].split("<!-- /targets -->", 1)[0]
    assert quoted == targets_table(load_gates(ROOT / "benchmarks" / "gates.yaml")), \
        "benchmarks/README.md's targets differ from gates.yaml: paste `python3 benchmarks/gate.py --targets` there"
    development = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    assert "gates.yaml" in development and not re.search(r"\d+(\.\d+)? ?ms at concurrency", development)
