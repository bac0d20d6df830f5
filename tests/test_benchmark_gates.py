"""benchmarks/gates.yaml is read by CI after the tests: a file it cannot parse, or a gate naming a
benchmark that does not exist, would fail CI only at its very end (or gate nothing)."""

from __future__ import annotations

import re
import sys

from support import ROOT


def test_every_gate_parses_and_names_an_existing_benchmark() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gate import load_gates

    gates = load_gates(ROOT / "benchmarks" / "gates.yaml")
    sources = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "benchmarks").glob("test_*.py"))
    for gate in gates:
        name = gate["measure"].split(":", 1)[0].split("[", 1)[0]
        assert re.search(rf"def {re.escape(name)}\(", sources), f"{gate['measure']}: no benchmark named {name}"
