"""Answer accuracy with and without retrieval, end to end: `dreamseed eval answers` (the product's
command, as a process) through a proxy to llama.cpp's `llama-server` with SmolLM2-135M-Instruct
(two slots of 8,192 tokens, its own context: 4,000 characters of Korean passages come to over 4,096
tokens in its tokenizer), on an English set (SQuAD 2.0 dev) and a Korean one (KorQuAD 1.0
dev) built by `answer_sets.py`: 300 questions each in full mode, 15 in short mode, each set's
corpus the paragraphs of the articles its questions come from.

The policies are the shipped rag.yaml with retrieval on for the catch-all rule. Full mode also
runs an instructed template (`INSTRUCTED`) beside the default one, the comparison that decides
the default; the arm without retrieval is asked once (its answers do not depend on rag.yaml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from answer_sets import write
from dreamseed.policy.schema import DEFAULT_TEMPLATE
from harness import MODE, start_proxy, write_policies, write_rag

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTED = "Use the passages below to answer the user's question in a few words.\n\n{context}\n\nQuestion: {query}"
LANGUAGES = ("all", "en", "ko")


def test_answer_accuracy(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dreamseed.standins.local_model import LlamaServer
    from real_server import SMOLLM_ID, real_model

    questions = 300 if MODE == "full" else 15
    folder = write(tmp_path / "set", questions)
    templates = {"default": DEFAULT_TEMPLATE, **({"instructed": INSTRUCTED} if MODE == "full" else {})}
    state = tmp_path / "state"
    state.mkdir()

    def measure() -> dict[str, Any]:
        result: dict[str, Any] = {"questions_per_language": questions}
        llama = LlamaServer.start(real_model(), SMOLLM_ID, context=8192, parallel=2)
        try:
            for name, template in templates.items():
                rag = yaml.safe_load((ROOT / "policies" / "rag.yaml").read_text(encoding="utf-8"))
                rag.pop("backends", None)
                rag["rules"] = {"default": {"enabled": True}}
                rag["defaults"]["template"] = template
                policies = write_rag(write_policies(tmp_path / f"policies-{name}", {"general": {
                    "url": llama.url, "model": SMOLLM_ID, "context_length": 8192, "max_concurrency": 2,
                    "timeouts": {"connect": 5, "read": 300, "write": 30, "pool": 600}}},
                    {"rules": [{"name": "default", "target": "general"}]}), rag)
                proxy = start_proxy(policies, env={"DREAMSEED_STATE_DIR": str(state)})
                try:
                    run = subprocess.run(
                        [sys.executable, "-m", "dreamseed.cli", "eval", "answers", str(folder), "--proxy", proxy.url,
                         "--policies", str(policies), "--concurrency", "2", "--json", "--quiet",
                         "--cache", str(tmp_path / "answers.jsonl")],
                        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DREAMSEED_STATE_DIR": str(state)},
                        timeout=6 * 3600)
                finally:
                    proxy.stop()
                assert run.returncode == 0, run.stdout + run.stderr
                scores = json.loads(run.stdout)
                prefix = "" if name == "default" else f"{name}_"
                for lang in LANGUAGES:
                    for arm, short in (("with_rag", "with"), ("without_rag", "without")):
                        row = scores[arm][lang]
                        for metric in ("accuracy", "em", "f1", "p50_ms", "p95_ms"):
                            result[f"{prefix}{lang}_{metric}_{short}"] = row[metric]
                        result[f"{prefix}{lang}_n"] = row["n"]
                    for metric in ("accuracy", "f1"):
                        gain, low, high = scores["difference"][lang][metric]
                        result[f"{prefix}{lang}_{metric}_gain"] = gain
                        result[f"{prefix}{lang}_{metric}_gain_low"] = low  # the 95 % interval's ends
                        result[f"{prefix}{lang}_{metric}_gain_high"] = high
        finally:
            llama.stop()
        return result

    benchmark.extra_info.update(benchmark.pedantic(measure, rounds=1, iterations=1))
