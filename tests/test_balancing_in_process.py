"""The balancing strategies (balancing.py) on a backend's replicas, with their loads set by hand."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dreamseed.backends import Upstreams
from dreamseed.balancing import ReplicaSet, conversation_key, scrape_queue
from dreamseed.policy import load_policies
from support import write_policies


def replica_set(tmp_path: Path, balance: str, count: int = 3, **backend: Any) -> ReplicaSet:
    policies = write_policies(tmp_path / "p", {"general": {
        "model": "m", "context_length": 4096, "balance": balance,
        "replicas": [{"url": f"http://127.0.0.1:{9100 + i}"} for i in range(count)], **backend}},
        {"rules": [{"name": "default", "target": "general"}]})
    return Upstreams.from_catalog(load_policies(policies).catalog, {})["general"]


class Load:
    """Stands in for a replica pool's counts."""

    def __init__(self, in_use: int = 0, waiting: int = 0) -> None:
        self.in_use, self.waiting = in_use, waiting

    def occupancy(self) -> int:
        return self.in_use + self.waiting


def set_loads(replicas: ReplicaSet, *loads: int) -> None:
    for upstream, load in zip(replicas, loads, strict=True):
        upstream.transport = Load(load)  # type: ignore[assignment]


def first_choices(replicas: ReplicaSet, keys: list[bytes | None]) -> list[str]:
    return [replicas.order(key)[0].label for key in keys]


def test_round_robin_takes_each_replica_in_turn_and_offers_the_rest_after(tmp_path: Path) -> None:
    replicas = replica_set(tmp_path, "round_robin")
    orders = [[u.label for u in replicas.order(None)] for _ in range(4)]
    assert orders[0] == ["general#1", "general#2", "general#3"]
    assert [order[0] for order in orders] == ["general#1", "general#2", "general#3", "general#1"]
    assert all(sorted(order) == ["general#1", "general#2", "general#3"] for order in orders)


def test_least_loaded_weighs_load_by_response_time(tmp_path: Path) -> None:
    replicas = replica_set(tmp_path, "least_loaded", max_concurrency=4)
    set_loads(replicas, 3, 1, 2)
    assert first_choices(replicas, [None]) == ["general#2"]  # nothing heard yet: the least full
    for upstream, seconds in zip(replicas, (0.1, 0.3, 0.1), strict=True):
        upstream.observe(seconds)
    # general#2 answers three times slower: 0.3 x (1 + 2/4) against 0.1 x (1 + 3/4) for #3.
    assert first_choices(replicas, [None]) == ["general#3"]
    replicas.replicas[2].reported_queue = 5  # its own /metrics says five wait inside it
    assert first_choices(replicas, [None]) == ["general#1"]
    set_loads(replicas, 16, 1, 16)  # the fast ones four times past their limit: now the slow one
    assert first_choices(replicas, [None]) == ["general#2"]


def test_a_conversation_maps_to_one_replica_and_conversations_spread_evenly(tmp_path: Path) -> None:
    replicas = replica_set(tmp_path, "prefix_affinity")
    set_loads(replicas, 0, 0, 0)
    keys = [conversation_key({"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": f"conversation {i}"}]}) for i in range(600)]
    first = first_choices(replicas, keys)
    assert first == first_choices(replicas, keys)  # the same start, the same replica
    share = Counter(first)
    assert len(share) == 3 and max(share.values()) < 0.4 * 600, share


def test_later_turns_have_the_same_key_as_the_first() -> None:
    opening = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "비밀번호를 잊었어요"}]
    later = [*opening, {"role": "assistant", "content": "재설정 링크를 보냈습니다."}, {"role": "user", "content": "고마워요"}]
    assert conversation_key({"messages": opening}) == conversation_key({"messages": later})
    assert conversation_key({"messages": opening}) != conversation_key({"messages": [opening[0], later[3]]})
    assert conversation_key({"prompt": "x" * 5000}) == conversation_key({"prompt": "x" * 2048 + "y"})
    assert conversation_key({"input": "no prompt"}) is None


def test_a_replica_over_the_load_bound_passes_its_conversations_on(tmp_path: Path) -> None:
    replicas = replica_set(tmp_path, "prefix_affinity", balance_load_factor=1.25)
    key = conversation_key({"messages": [{"role": "user", "content": "hot"}]})
    owner = replicas.order(key)[0]
    loads = [0, 0, 0]
    loads[owner.index] = 5  # with this request 6 in all: a mean of 2, a bound of ceil(1.25 x 2) = 3
    set_loads(replicas, *loads)
    spilled = replicas.order(key)
    assert spilled[0] is not owner and owner in spilled[1:]
    assert owner.affinity_hits == 1 and spilled[0].affinity_spills == 1
    set_loads(replicas, 2, 2, 2)  # 7 with this request: a bound of ceil(1.25 x 7 / 3) = 3, which 2 + 1 keeps
    assert replicas.order(key)[0] is owner


@pytest.mark.parametrize(("text", "expected"), [
    (b'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m",engine="0"} 3.0\n', 3.0),
    (b"llamacpp:requests_deferred 2\nllamacpp:requests_processing 1\n", 2.0),
    (b"some_other_metric 7\n", None),
])
def test_a_servers_queue_is_read_from_its_metrics(text: bytes, expected: float | None) -> None:
    import asyncio

    import httpx

    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=text)),
                               base_url="http://replica")
    assert asyncio.run(scrape_queue(client, 1.0)) == expected
