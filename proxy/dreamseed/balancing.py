"""Which replica of a backend takes a request: the `balance` setting in backends.yaml.

  round_robin      in turn.
  least_loaded     the lowest expected response time: the replica's smoothed response time, stretched
                   by how full it is (the requests in flight and waiting as this worker counts them,
                   plus the queue its own /metrics last reported: vLLM's `vllm:num_requests_waiting`,
                   llama.cpp's `llamacpp:requests_deferred`; over its max_concurrency). A model server
                   batches: a replica half full answers about as fast as an empty one, so a replica
                   three times slower gets requests only once the fast ones are full.
  prefix_affinity  requests that start the same conversation (the same leading messages up to the
                   first user message, or the same start of a prompt) go to the same replica, whose
                   prompt cache holds that start and, turn after turn, the conversation so far. The
                   replica is the conversation's place on a hash ring, taken while its load stays
                   within `balance_load_factor` of the mean load with this request counted, else the
                   next replica on the ring: consistent hashing with bounded loads (Mirrokni, Thorup
                   and Zadimoghaddam, 2016), so a hot conversation start cannot overload one replica.

Each strategy gives an order, not one replica: the request path tries the replicas in it, skipping
any whose circuit is open, before the rule's fallback chain moves on to another backend.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

import httpx
import msgspec

from .policy import Backend

RING_POINTS = 64  # points per replica on the ring: enough that replicas share it within a few percent
PROMPT_KEY_CHARS = 2048  # a completion prompt's start that names its conversation


def conversation_key(payload: Mapping[str, Any]) -> bytes | None:
    """What identifies a request's conversation start: the messages up to and including the first
    user message (the system prompt and the opening question, which every later turn repeats), or
    a prompt's first characters. None when the request has neither."""
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        start = []
        for message in messages:
            start.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return msgspec.json.encode(start)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt[:PROMPT_KEY_CHARS].encode()
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0][:PROMPT_KEY_CHARS].encode()
    return None


class Server(Protocol):
    """What balancing needs of a replica (backends.Upstream is one)."""

    backend: Backend
    index: int
    replicas: int
    client: httpx.AsyncClient | None
    affinity_hits: int
    affinity_spills: int
    reported_queue: float
    response_time: float | None

    @property
    def label(self) -> str: ...

    def load(self) -> float: ...


S = TypeVar("S", bound=Server)


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ReplicaSet(Generic[S]):
    """A backend's replicas and its balancing state. One per backend and policy generation."""

    def __init__(self, name: str, backend: Backend, replicas: list[S]) -> None:
        self.name = name
        self.backend = backend
        self.replicas = replicas
        self._turn = itertools.count()
        points = sorted((_point(f"{replica.label}-{i}".encode()), index)
                        for index, replica in enumerate(replicas) for i in range(RING_POINTS))
        self._ring_points = [point for point, _ in points]
        self._ring_owners = [index for _, index in points]

    def __iter__(self) -> Iterator[S]:
        return iter(self.replicas)

    def order(self, key: bytes | None) -> list[S]:
        """The replicas in the order this request should try them."""
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas
        balance = self.backend.balance
        if balance == "prefix_affinity" and key is not None:
            return self._by_affinity(key)
        if balance == "round_robin":
            start = next(self._turn) % len(replicas)
            return replicas[start:] + replicas[:start]
        # least_loaded, and prefix_affinity for a request without a conversation start; ties in turn.
        start = next(self._turn)
        count = len(replicas)
        known = [r.response_time for r in replicas if r.response_time is not None]
        typical = sum(known) / len(known) if known else 1.0  # a replica not heard from yet counts as typical

        capacity = self.backend.max_concurrency

        def expected(r: S) -> float:
            return (r.response_time if r.response_time is not None else typical) * (1 + (r.load() + 1) / capacity)

        return sorted(replicas, key=lambda r: (expected(r), (r.index - start) % count))

    def _by_affinity(self, key: bytes) -> list[S]:
        ring: list[int] = []  # replica indexes in ring order from the key's point, each once
        position = bisect.bisect(self._ring_points, _point(key))
        points = len(self._ring_owners)
        for step in range(points):
            owner = self._ring_owners[(position + step) % points]
            if owner not in ring:
                ring.append(owner)
                if len(ring) == len(self.replicas):
                    break
        loads = [replica.load() for replica in self.replicas]
        bound = math.ceil(self.backend.balance_load_factor * (sum(loads) + 1) / len(self.replicas))
        chosen = next((index for index in ring if loads[index] + 1 <= bound), ring[0])
        replica = self.replicas[chosen]
        if chosen == ring[0]:
            replica.affinity_hits += 1
        else:
            replica.affinity_spills += 1
        return [replica, *(self.replicas[index] for index in ring if index != chosen)]


# The requests a server holds but has not started: vLLM's gauge, and llama.cpp's (llama-server
# --metrics) for requests deferred until a slot frees up.
SERVER_QUEUE = re.compile(rb"^(?:vllm:num_requests_waiting|llamacpp:requests_deferred)(?:\{[^}]*\})?\s+([0-9.eE+-]+)",
                          re.MULTILINE)


async def scrape_queue(client: httpx.AsyncClient, timeout: float) -> float | None:
    """The queue a server's /metrics reports (summed over its models), or None when it has none."""
    try:
        response = await client.get("/metrics", timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    found = SERVER_QUEUE.findall(response.content)
    return sum(float(value) for value in found) if found else None


class QueueWatcher:
    """For `least_loaded` backends of several replicas: each replica's own queue, read from its
    /metrics every health interval (a server without the gauge keeps 0)."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, replicas: Iterable[Server]) -> None:
        for upstream in replicas:
            if upstream.backend.balance == "least_loaded" and upstream.replicas > 1 and upstream.client is not None:
                self._tasks.append(asyncio.create_task(self._run(upstream), name=f"queue:{upstream.label}"))

    async def _run(self, upstream: Server) -> None:
        assert upstream.client is not None
        settings = upstream.backend.health
        while True:
            queue = await scrape_queue(upstream.client, settings.timeout)
            upstream.reported_queue = queue or 0.0
            await asyncio.sleep(settings.interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
