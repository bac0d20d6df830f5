"""Routing decision time per rule kind, on the seed policies.

Run: python3 -m pytest benchmarks/test_routing_speed.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamseed.policy import load_policies
from dreamseed.routing import Prompt, Router

SEED = Path(__file__).resolve().parent.parent / "policies"

CASES = {
    # name: (model, prompt, expected rule) — each stops at a different rule, so the cost of
    # every rule kind before it is included.
    "direct-model": ("code", "hello", "direct"),
    "long-prompt": ("auto", "a" * 2500, "long-prompt"),
    "keyword-korean": ("auto", "파이썬으로 정렬 코드를 작성해 주세요", "code"),
    "keyword-english": ("auto", "Please write a function that sorts a list", "code"),
    "fast": ("auto", "빠른 답변 부탁해요", "fast"),
    "default-short": ("auto", "What is the capital of Korea?", "default"),
    "default-1900-chars": ("auto", "plain text without any keyword. " * 59, "default"),
}


@pytest.fixture(scope="module")
def router() -> Router:
    policies = load_policies(SEED)
    return Router(policies.routing, policies.catalog)


@pytest.mark.parametrize("case", list(CASES))
def test_route(benchmark, router: Router, case: str) -> None:  # type: ignore[no-untyped-def]
    model, text, rule = CASES[case]
    messages = [{"role": "user", "content": text}]
    # A fresh Prompt per call, as in the proxy: normalisation is part of the cost.
    decision = benchmark(lambda: router.route(model, Prompt(messages=messages)))
    assert decision.rule == rule
    benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6
