"""Scores per language and overall, with and without retrieval, and their difference: the JSON
`eval answers --json` prints and the table it prints by default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .asking import ARMS, Answer
from .dataset import Question
from .judge import parse_verdict
from .scoring import bootstrap_difference, contains, exact_match, f1

SCORES = {"accuracy": contains, "em": exact_match, "f1": f1}


def summarize(questions: Sequence[Question], answers: Sequence[Answer],
              verdicts: Mapping[tuple[str, str], Answer] | None = None) -> dict[str, Any]:
    """Questions answered in both arms are scored (a pair is what the difference needs); the rest
    are counted as failed, with their errors."""
    by_key = {(a.question, a.arm): a for a in answers}
    scored = [q for q in questions if all(by_key.get((q.id, arm)) and by_key[(q.id, arm)].error is None for arm in ARMS)]
    failures = [a for a in answers if a.error is not None]
    languages = ["all", *sorted({q.lang for q in scored})]
    result: dict[str, Any] = {arm: {} for arm in ARMS}
    result["difference"] = {}
    for lang in languages:
        group = [q for q in scored if lang in ("all", q.lang)]
        per_arm: dict[str, dict[str, list[float]]] = {}
        for arm in ARMS:
            got = [by_key[(q.id, arm)] for q in group]
            values = {name: [score(a.text, q.answers, q.lang) for a, q in zip(got, group, strict=True)]
                      for name, score in SCORES.items()}
            per_arm[arm] = values
            seconds = [a.seconds * 1e3 for a in got]
            row: dict[str, Any] = {"n": len(group), **{name: _mean(v) for name, v in values.items()},
                                   "p50_ms": _percentile(seconds, 50), "p95_ms": _percentile(seconds, 95),
                                   "rag_off": sum(a.rag == "off" for a in got),
                                   "rag_degraded": sum(a.rag == "degraded" for a in got)}
            if verdicts is not None:
                parsed = [parse_verdict(verdicts[(q.id, arm)].text) for q in group if (q.id, arm) in verdicts]
                decided = [v for v in parsed if v is not None]
                row["judge"] = _mean([1.0 if v else 0.0 for v in decided])
                row["judge_unparsed"] = len(parsed) - len(decided)
                row["judge_failed"] = len(group) - len(parsed)
            result[arm][lang] = row
        result["difference"][lang] = {"n": len(group), **{
            name: list(bootstrap_difference(per_arm["with_rag"][name], per_arm["without_rag"][name]))
            for name in SCORES}}
    result["questions"] = len(questions)
    result["scored"] = len(scored)
    result["failed_requests"] = len(failures)
    result["errors"] = [f"question {a.question} ({a.arm}): {a.error}" for a in failures[:5]]
    return result


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def table(result: Mapping[str, Any]) -> str:
    judged = any("judge" in row for row in result["with_rag"].values())
    head = f"{'':12} {'lang':4} {'n':>5} {'accuracy':>9} {'EM':>6} {'F1':>6} {'P50 ms':>8} {'P95 ms':>8}"
    lines = [head + (f" {'judge':>6} {'unparsed':>8}" if judged else "")]
    for arm in ("without_rag", "with_rag"):
        for lang, row in result[arm].items():
            line = (f"{arm.replace('_', ' '):12} {lang:4} {row['n']:5} {row['accuracy']:9.3f} {row['em']:6.3f} "
                    f"{row['f1']:6.3f} {row['p50_ms']:8.0f} {row['p95_ms']:8.0f}")
            if judged:
                line += f" {row['judge']:6.3f} {row['judge_unparsed']:8}"
            lines.append(line)
    lines.append("with - without, and its 95 % bootstrap interval:")
    for lang, row in result["difference"].items():
        lines.append(f"  {lang:4} " + "   ".join(f"{name} {d:+.3f} [{low:+.3f}, {high:+.3f}]"
                                              for name, (d, low, high) in ((k, row[k]) for k in SCORES)))
    off = result["with_rag"].get("all", {}).get("rag_off", 0)
    if off:
        lines.append(f"note: {off} requests meant to retrieve were answered without retrieval (x-dreamseed-rag: off): "
                     "rag.yaml does not enable it for the rule they matched")
    degraded = result["with_rag"].get("all", {}).get("rag_degraded", 0)
    if degraded:
        lines.append(f"note: {degraded} requests got no context because retrieval was degraded (store down or over budget)")
    lines.append(f"scored {result['scored']} of {result['questions']} questions"
                 + (f"; {result['failed_requests']} requests failed, first: {result['errors'][0]}"
                    if result["failed_requests"] else ""))
    return "\n".join(lines)
