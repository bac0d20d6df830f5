"""Live connections to the backends in the catalog: per replica of each backend, a request pool, a
circuit and a client for probes; per backend, its replicas and their balancing (balancing.py).

Pools are built once per policy generation and closed when no generation uses them. A replica's
request pool's size is the backend's ``max_concurrency`` (counted across the workers: slots.py), so
the proxy never sends a server more requests than it can take; health and readiness probes have
connections of their own, outside that limit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .balancing import ReplicaSet
from .health import Circuit
from .policy import Backend, Catalog
from .transport import PooledTransport, SlotCounter, Timeouts

log = logging.getLogger("dreamseed.backends")

# vLLM's HTTP server (uvicorn) closes idle keep-alive connections after 5 s. Expiring ours
# sooner means we never send a request down a socket the server is about to close.
KEEPALIVE_EXPIRY_S = 4.0
PROBE_CONNECTIONS = 2  # a health probe and a scaler readiness check at once

# Who counts a backend's slots: (name, max_concurrency, max_queue) -> its counter. With
# `serve --workers N` it is the worker's slots.WorkerSlots.counter; None: each pool counts alone.
SlotSource = Callable[[str, int, int | None], SlotCounter]


@dataclass(slots=True)
class Upstream:
    """One server of a backend (its only one, or one of its replicas)."""

    name: str  # the backend's
    backend: Backend
    url: str | None
    client: httpx.AsyncClient | None
    # Why this replica cannot be used at all (e.g. its URL is not configured); None if usable.
    unavailable: str | None = None
    transport: PooledTransport | None = None
    timeouts: Timeouts | None = None
    circuit: Circuit | None = None
    index: int = 0  # which replica, from 0
    replicas: int = 1  # how many the backend has
    affinity_hits: int = 0  # requests sent here because their conversation start maps here
    affinity_spills: int = 0  # requests sent here because the replica their start maps to was full
    reported_queue: float = 0.0  # requests waiting inside the server, from its /metrics when scraped
    # Seconds from sending a request to the answer's head, smoothed (least_loaded weighs load by it);
    # None until the first answer.
    response_time: float | None = None
    _heads: dict[str, bytes] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The backend's name; `name#1`, `name#2`... for the replicas of a backend that has several."""
        return replica_label(self.name, self.index, self.replicas)

    def load(self) -> float:
        """Requests in flight or waiting here, every worker's (the shared slots count them), plus the
        server's own queue."""
        transport = self.transport
        return (transport.occupancy() if transport is not None else 0) + self.reported_queue

    def observe(self, seconds: float) -> None:
        """One answer's time to its head, into the smoothed response time (weight 0.2: about the
        last ten answers count)."""
        previous = self.response_time
        self.response_time = seconds if previous is None else previous + 0.2 * (seconds - previous)

    async def aclose(self) -> None:
        """Close the request pool and the probes' connections."""
        if self.client is not None:
            await self.client.aclose()
        if self.transport is not None:
            await self.transport.aclose()

    def request_bytes(self, path: str, body: bytes, extra_headers: list[tuple[bytes, bytes]]) -> bytes:
        """A complete POST request for this backend. The head's constant part (request line,
        host, content type, the backend's key) is built once per path."""
        prefix = self._heads.get(path)
        if prefix is None:
            assert self.transport is not None and self.url is not None
            base_path = urlsplit(self.url).path.rstrip("/")
            lines = [f"POST {base_path}{path} HTTP/1.1", f"host: {self.transport.authority}",
                     "content-type: application/json", "accept-encoding: identity"]
            if self.client is not None and "authorization" in self.client.headers:
                lines.append(f"authorization: {self.client.headers['authorization']}")
            prefix = self._heads[path] = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        parts = [prefix, b"content-length: ", str(len(body)).encode()]
        for name, value in extra_headers:
            parts += [b"\r\n", name, b": ", value]
        parts += [b"\r\n\r\n", body]
        return b"".join(parts)


def connect(name: str, backend: Backend, url: str, environ: Mapping[str, str],
            slot_source: SlotSource | None = None, index: int = 0) -> Upstream:
    """A replica's pool, and the httpx client over it."""
    t = backend.timeouts
    headers = {"accept-encoding": "identity"}  # relay bytes as the backend sent them
    if backend.api_key_env and environ.get(backend.api_key_env):
        headers["authorization"] = f"Bearer {environ[backend.api_key_env]}"
    replicas = len(backend.replica_list())
    upstream = Upstream(name, backend, url, None, index=index, replicas=replicas)
    slots = (slot_source(upstream.label, backend.max_concurrency, backend.max_queue)
             if slot_source is not None else None)
    transport = PooledTransport(url, max_connections=backend.max_concurrency, max_queue=backend.max_queue,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S, slots=slots)
    # Health and readiness probes get connections of their own: a backend busy at its limit must
    # not make its probe wait for a slot (and time out, and open the circuit), nor have the probe
    # take a slot or show as a queued request.
    probes = PooledTransport(url, max_connections=PROBE_CONNECTIONS, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    client = httpx.AsyncClient(
        base_url=url,
        headers=headers,
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        transport=probes,  # httpx's client API over a lean pool (transport.py says why)
        # Never let HTTP_PROXY or similar settings reroute traffic meant for our own backends.
        trust_env=False,
    )
    upstream.client, upstream.transport = client, transport
    upstream.timeouts = Timeouts(t.connect, t.read, t.write, t.pool, t.first_byte)
    upstream.circuit = Circuit(upstream.label, backend.health)
    return upstream


def replica_label(name: str, index: int, replicas: int) -> str:
    return name if replicas == 1 else f"{name}#{index + 1}"


def resolved_urls(name: str, backend: Backend, environ: Mapping[str, str],
                  url_overrides: Mapping[str, str]) -> list[str | None]:
    """Each replica's URL now; `url_overrides` (stand-ins) are by replica label (the backend's name
    for a backend of one server)."""
    replicas = backend.replica_list()
    return [url_overrides.get(replica_label(name, index, len(replicas))) or replica.resolve_url(environ)
            for index, replica in enumerate(replicas)]


def make_replicas(name: str, backend: Backend, environ: Mapping[str, str], url_overrides: Mapping[str, str],
                  slot_source: SlotSource | None = None) -> ReplicaSet[Upstream]:
    replicas = backend.replica_list()
    upstreams = []
    for index, (replica, url) in enumerate(zip(replicas, resolved_urls(name, backend, environ, url_overrides),
                                               strict=True)):
        if url is None:
            why = f"no URL: set {replica.url_env}" if replica.url_env else "no URL configured"
            log.warning("backend %s is unavailable (%s)", replica_label(name, index, len(replicas)), why)
            upstreams.append(Upstream(name, backend, None, None, why, index=index, replicas=len(replicas)))
        else:
            upstreams.append(connect(name, backend, url, environ, slot_source, index))
    return ReplicaSet(name, backend, upstreams)


class Upstreams:
    """All backends of one policy generation, by name: each a :class:`ReplicaSet`. Iterating gives
    every replica of every backend."""

    def __init__(self, upstreams: dict[str, ReplicaSet[Upstream]]) -> None:
        self._by_name = upstreams

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        environ: Mapping[str, str] | None = None,
        url_overrides: Mapping[str, str] | None = None,
        slot_source: SlotSource | None = None,
    ) -> Upstreams:
        environ = os.environ if environ is None else environ
        return cls({name: make_replicas(name, backend, environ, url_overrides or {}, slot_source)
                    for name, backend in catalog.backends.items()})

    def __getitem__(self, name: str) -> ReplicaSet[Upstream]:
        return self._by_name[name]

    def get(self, name: str) -> ReplicaSet[Upstream] | None:
        return self._by_name.get(name)

    def sets(self) -> Iterator[ReplicaSet[Upstream]]:
        return iter(self._by_name.values())

    def replace(self, name: str, replicas: ReplicaSet[Upstream]) -> None:
        """A backend's replicas as discovery found them (discovery.py); requests after this use them."""
        self._by_name[name] = replicas

    def __iter__(self) -> Iterator[Upstream]:
        return (replica for replicas in self._by_name.values() for replica in replicas)

    async def aclose(self) -> None:
        for upstream in self:
            await upstream.aclose()
