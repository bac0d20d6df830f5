"""Any one backend down, every shipped rule still answers: the seed targets 99.9 % availability,
so each rule in policies/routing.yaml has a fallback chain. Each backend's server is killed in
turn (a real process ending, its port refusing connections), and a prompt for every rule must
get a 200, from a fallback (said in x-dreamseed-fallback) when the rule's target is the one down."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml

from support import SEED_POLICIES, Process, Sim, seed_catalog, start_proxy, start_sim, write_policies

# One prompt per shipped rule, and the rule it must match.
PROMPTS = {"long-prompt": "x" * 2001, "code": "파이썬 함수를 짜줘", "fast": "빠른 답변 부탁해요", "default": "hello"}


@pytest.fixture(scope="module")
def seed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, Sim]]]:
    catalog = seed_catalog()
    sims = {name: start_sim(backend["model"]) for name, backend in catalog["backends"].items()}
    try:
        for name, backend in catalog["backends"].items():
            backend.pop("url_env", None)  # the simulators stand in for every backend, general70's too
            backend.pop("api_key_env", None)
            backend["url"] = sims[name].url
            backend["health"] = {"interval": 0.5, "timeout": 1, "unhealthy_threshold": 1000}
        routing = yaml.safe_load((SEED_POLICIES / "routing.yaml").read_text(encoding="utf-8"))
        proxy = start_proxy(write_policies(tmp_path_factory.mktemp("seed"), catalog["backends"], routing,
                                           hosts=catalog["hosts"]))
    except BaseException:
        for sim in sims.values():
            sim.stop()
        raise
    yield proxy, sims
    proxy.stop()
    for sim in sims.values():
        sim.stop()


def test_every_shipped_rule_has_a_fallback_chain() -> None:
    rules = yaml.safe_load((SEED_POLICIES / "routing.yaml").read_text(encoding="utf-8"))["rules"]
    assert {rule["name"] for rule in rules} == set(PROMPTS)
    assert all(rule.get("fallback") for rule in rules), [r["name"] for r in rules if not r.get("fallback")]


@pytest.mark.parametrize("down", ["general", "code", "fast", "general70"])
def test_every_rule_answers_with_any_one_backend_down(seed_stack: tuple[Process, dict[str, Sim]], down: str) -> None:
    proxy, sims = seed_stack
    port = int(sims[down].url.rsplit(":", 1)[1])
    model = seed_catalog()["backends"][down]["model"]
    sims[down].stop()
    try:
        for rule, prompt in PROMPTS.items():
            response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                                  json={"model": "auto", "messages": [{"role": "user", "content": prompt}]})
            assert response.status_code == 200, (down, rule, response.text)
            assert response.headers["x-dreamseed-rule"] == rule
            assert response.headers["x-dreamseed-backend"] != down
            target = {"long-prompt": "general70", "code": "code", "fast": "fast", "default": "general"}[rule]
            if target == down:
                assert response.headers["x-dreamseed-fallback"].startswith(f"{down}:"), (rule, response.headers)
    finally:
        sims[down] = start_sim(model, port=port)  # back on its port for the next case
