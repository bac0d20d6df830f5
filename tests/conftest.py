"""The shared test stack: the seed catalog served by simulated vLLM processes, plus a few
backends that exist to fail (a closed port, an unset URL, a slow server with a short
read timeout), behind one real proxy process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from support import Process, Sim, free_port, seed_catalog, start_proxy, start_sim, write_policies

REMOTE_KEY = "remote-secret-key"
ADMIN_KEY = "stack-admin-key"


@dataclass
class Stack:
    proxy: Process
    sims: dict[str, Sim]
    policies: Path

    @property
    def url(self) -> str:
        return self.proxy.url

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)  # type: ignore[arg-type]


def stack_routing() -> dict[str, object]:
    """The seed rules, preceded by alias-only rules that send traffic at the failing backends
    (alias rules never match model 'auto', so the seed behaviour is unchanged)."""
    import yaml

    from support import SEED_POLICIES

    seed = yaml.safe_load((SEED_POLICIES / "routing.yaml").read_text(encoding="utf-8"))
    extra = [
        {"name": "dead-first", "match": {"models": ["dead-first"]}, "target": "dead", "fallback": ["general"]},
        {"name": "unset-first", "match": {"models": ["unset-first"]}, "target": "unset", "fallback": ["dead", "general"]},
        {"name": "all-dead", "match": {"models": ["all-dead"]}, "target": "dead", "fallback": ["unset"]},
    ]
    return {"rules": extra + seed["rules"]}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    catalog = seed_catalog()
    sims: dict[str, Sim] = {}
    try:
        for name, backend in catalog["backends"].items():
            knobs = {"api_key": REMOTE_KEY} if name == "general70" else {}
            sims[name] = start_sim(backend["model"], **knobs)
        sims["slow"] = start_sim("slow-model", ttft=5)
        backends = catalog["backends"]
        for name in ("general", "code", "fast"):
            backends[name]["url"] = sims[name].url
        # general70 keeps url_env/api_key_env: the proxy's environment provides both.
        backends["dead"] = {"url": f"http://127.0.0.1:{free_port()}", "model": "dead-model", "context_length": 4096}
        backends["unset"] = {"url_env": "DREAMSEED_TEST_UNSET_URL", "model": "unset-model", "context_length": 4096}
        backends["slow"] = {"url": sims["slow"].url, "model": "slow-model", "context_length": 4096,
                            "timeouts": {"connect": 2, "read": 0.5, "write": 2, "pool": 2}}
        # Circuits never open here (tests/faults/ covers them): other tests need predictable routing.
        # The stack lives for the whole session and `dead` fails a probe every 0.5 s, so the threshold
        # must outlast any suite (a thousand probes were eight minutes: a longer suite opened it).
        for backend in backends.values():
            backend["health"] = {"interval": 0.5, "timeout": 1, "unhealthy_threshold": 10**9}
        policies = write_policies(tmp_path_factory.mktemp("policies"), backends, stack_routing(),
                                  hosts=catalog["hosts"])
        env = {"DREAMSEED_GENERAL70_URL": sims["general70"].url, "DREAMSEED_GENERAL70_API_KEY": REMOTE_KEY,
               "DREAMSEED_ADMIN_KEY": ADMIN_KEY}
        proxy = start_proxy(policies, env=env)
    except BaseException:
        for sim in sims.values():
            sim.stop()
        raise
    yield Stack(proxy, sims, policies)
    proxy.stop()
    for sim in sims.values():
        sim.stop()


@pytest.fixture
def fresh(stack: Stack) -> Iterator[Stack]:
    """The stack with every simulated backend reset before and after the test."""
    for sim in stack.sims.values():
        sim.reset()
    yield stack
    for sim in stack.sims.values():
        sim.reset()
