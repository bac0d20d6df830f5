"""Replicas found by DNS: for a backend with `discover: dns`, the addresses its URL's host name
resolves to are its replicas, looked up again every `discover_interval` seconds. A Kubernetes
headless Service answers with one address per ready pod, so a rolling update or a rescheduled pod
changes the replicas without a policy change.

On a change the backend gets a new ReplicaSet in the running generation: replicas whose address is
still there keep their pool, circuit and affinity; new addresses get fresh ones; a vanished
address's pool closes once its requests have finished. Balancing works over the new set at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

from .backends import SlotSource, Upstream, Upstreams, connect
from .balancing import ReplicaSet

log = logging.getLogger("dreamseed.discovery")

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The host name's addresses, IPv4 and IPv6, each once, sorted (so an unchanged set compares equal)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def address_url(url: str, address: str) -> str:
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class DnsDiscovery:
    """One task per `discover: dns` backend of the running generation."""

    def __init__(self, environ: Mapping[str, str], slot_source: SlotSource | None, resolver: Resolver = resolve,
                 on_change: Callable[[str, list[Upstream], list[Upstream]], None] | None = None) -> None:
        self.environ = environ
        self.slot_source = slot_source
        self.resolver = resolver
        self.on_change = on_change or (lambda name, added, removed: None)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, upstreams: Upstreams) -> None:
        for replicas in list(upstreams.sets()):
            if replicas.backend.discover == "dns" and replicas.replicas and replicas.replicas[0].url is not None:
                self._tasks.append(asyncio.create_task(self._run(upstreams, replicas.name, replicas.replicas[0].url),
                                                       name=f"discover:{replicas.name}"))

    async def refresh(self, upstreams: Upstreams, name: str, url: str) -> bool:
        """Look the name up once and apply what changed; True when the replicas changed."""
        parts = urlsplit(url)
        current = upstreams[name]
        try:
            addresses = await self.resolver(parts.hostname or "", parts.port or 80)
        except OSError as exc:
            log.warning("backend %s: cannot resolve %s (%s); keeping its %d replica(s)", name, parts.hostname, exc,
                        len(current.replicas))
            return False
        if not addresses:
            return False  # no ready pod: keep the last known (their circuits say whether they answer)
        wanted = [address_url(url, address) for address in addresses]
        if [r.url for r in current.replicas] == wanted:
            return False
        backend = current.backend
        kept = {r.url: r for r in current.replicas}
        replicas: list[Upstream] = []
        for index, replica_url in enumerate(wanted):
            old = kept.pop(replica_url, None)
            if old is not None:
                old.index, old.replicas = index, len(wanted)
                replicas.append(old)
            else:
                replicas.append(connect(name, backend, replica_url, self.environ, None, index))
        for index, replica in enumerate(replicas):
            replica.index, replica.replicas = index, len(replicas)
            if replica.circuit is not None:
                replica.circuit.name = replica.label
        upstreams.replace(name, ReplicaSet(name, backend, replicas))
        added = [r for r in replicas if r.url not in {u.url for u in current.replicas}]
        log.info("backend %s: %d replica(s) from DNS (%s)", name, len(replicas), ", ".join(a for a in addresses))
        self.on_change(name, added, list(kept.values()))
        return True

    async def _run(self, upstreams: Upstreams, name: str, url: str) -> None:
        interval = upstreams[name].backend.discover_interval
        while True:
            try:
                await self.refresh(upstreams, name, url)
            except Exception:  # a lookup must never end discovery
                log.exception("backend %s: discovery failed", name)
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
