"""Replicas found by DNS (discovery.py), with a fake resolver standing in for a Kubernetes headless
Service's answers as pods come and go."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dreamseed.backends import Upstream, Upstreams
from dreamseed.discovery import DnsDiscovery, address_url
from dreamseed.policy import load_policies
from support import write_policies


def test_the_replicas_follow_the_names_addresses_and_keep_their_state(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "p", {"general": {
        "model": "m", "context_length": 4096, "url": "http://dreamseed-general:8000", "discover": "dns",
        "balance": "prefix_affinity"}}, {"rules": [{"name": "default", "target": "general"}]})
    upstreams = Upstreams.from_catalog(load_policies(policies).catalog, {})
    answers: list[list[str] | OSError] = [["10.0.0.7", "10.0.0.9"], ["10.0.0.9", "10.0.0.12"], OSError("SERVFAIL"), []]
    asked: list[tuple[str, int]] = []
    changes: list[tuple[list[str], list[str]]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    def changed(name: str, added: list[Upstream], removed: list[Upstream]) -> None:
        changes.append(([u.url or "" for u in added], [u.url or "" for u in removed]))

    discovery = DnsDiscovery({}, None, resolver, changed)
    url = "http://dreamseed-general:8000"

    async def scenario() -> None:
        assert await discovery.refresh(upstreams, "general", url)
        first = upstreams["general"]
        assert [r.url for r in first] == ["http://10.0.0.7:8000", "http://10.0.0.9:8000"]
        assert [r.label for r in first] == ["general#1", "general#2"]
        survivor = first.replicas[1]
        survivor.affinity_hits = 5  # state a pod keeps while it lives
        assert await discovery.refresh(upstreams, "general", url)  # a rolling update: .7 went, .12 came
        second = upstreams["general"]
        assert [r.url for r in second] == ["http://10.0.0.9:8000", "http://10.0.0.12:8000"]
        assert second.replicas[0] is survivor and survivor.affinity_hits == 5 and survivor.label == "general#1"
        assert survivor.circuit is not None and survivor.circuit.name == "general#1"
        assert not await discovery.refresh(upstreams, "general", url)  # DNS failing: keep what we have
        assert not await discovery.refresh(upstreams, "general", url)  # no ready pod: keep the last known
        assert upstreams["general"] is second
        key = b"conversation"
        assert second.order(key)[0] in second.replicas  # balancing works over the new set
        for upstream in upstreams:
            await upstream.aclose()
        for _, removed in changes:
            assert all(u.startswith("http://") for u in removed)

    asyncio.run(scenario())
    assert asked == [("dreamseed-general", 8000)] * 4
    assert changes == [(["http://10.0.0.7:8000", "http://10.0.0.9:8000"], ["http://dreamseed-general:8000"]),
                       (["http://10.0.0.12:8000"], ["http://10.0.0.7:8000"])]


def test_ipv6_addresses_are_bracketed_in_the_url() -> None:
    assert address_url("http://models:8000", "fd00::5") == "http://[fd00::5]:8000"
    assert address_url("http://models", "10.1.2.3") == "http://10.1.2.3"
