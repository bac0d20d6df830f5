"""The running proxy's state: the current policy generation, and how it is replaced.

A *generation* is one validated load of `policies/`: its router and its backend pools. Each
request reads the current generation once and uses it to the end, so a reload never changes
the rules under a request in flight. A reload validates first and swaps only if everything
is valid; an invalid edit leaves the running generation in place and is reported (log,
counters, GET /admin/policies). Backends whose settings did not change keep their pools and
circuits; the pools of removed or changed backends close once their requests have finished.

Reloads happen on a change to the policy files (polled), on SIGHUP, and on
POST /admin/policies/reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .backends import SlotSource, Upstream, Upstreams, make_replicas, resolved_urls
from .balancing import QueueWatcher, ReplicaSet
from .discovery import DnsDiscovery
from .health import Circuit, HealthMonitor
from .policy import Policies, PolicyError, load_policies
from .routing import Router

log = logging.getLogger("dreamseed.policies")

WATCH_INTERVAL_S = 1.0
RETIRE_POLL_S = 0.5
RETIRE_MAX_WAIT_S = 900.0  # the longest a retired pool waits for its requests before closing anyway


def policy_hash(directory: Path, leave_out: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.yaml")):
        if path.name in leave_out:
            continue
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detection: names, sizes and modification times of the policy files."""
    entries = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class Generation:
    policies: Policies
    router: Router
    upstreams: Upstreams
    policy_hash: str
    loaded_at: float


@dataclass
class ReloadOutcome:
    ok: bool
    changed: bool
    policy_hash: str
    error: str | None = None


class Runtime:
    def __init__(self, policies: Policies, environ: Mapping[str, str], url_overrides: Mapping[str, str],
                 on_reload: Callable[[bool], None] | None = None, slot_source: SlotSource | None = None) -> None:
        self.directory = policies.directory
        self.environ = environ
        self.url_overrides = url_overrides
        self.slot_source = slot_source
        upstreams = Upstreams.from_catalog(policies.catalog, environ, url_overrides, slot_source)
        self.current = Generation(policies, Router(policies.routing, policies.catalog), upstreams,
                                  policy_hash(self.directory), time.time())
        self.reloads = {"success": 0, "failure": 0}
        self._on_reload = on_reload or (lambda ok: None)
        self.last_error: str | None = None
        self.last_attempt: float | None = None
        self._monitor = HealthMonitor()
        self._queues = QueueWatcher()
        self._discovery = DnsDiscovery(environ, slot_source, on_change=self._replicas_changed)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retiring: list[Upstream] = []

    async def start(self, *, watch: bool) -> None:
        self._monitor.start(self._probe_targets(self.current.upstreams))
        self._queues.start(self.current.upstreams)
        self._discovery.start(self.current.upstreams)
        if watch:
            self._spawn(self._watch())
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_quietly("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):  # not on the main thread, or no signals here
            pass

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _probe_targets(upstreams: Upstreams) -> list[tuple[Circuit, httpx.AsyncClient]]:
        return [(u.circuit, u.client) for u in upstreams if u.circuit is not None and u.client is not None]

    async def reload(self, reason: str) -> ReloadOutcome:
        async with self._lock:
            self.last_attempt = time.time()
            try:
                policies = load_policies(self.directory)
            except PolicyError as exc:
                self.reloads["failure"] += 1
                self._on_reload(False)
                self.last_error = str(exc)
                log.error("policy reload (%s) refused, keeping policy %s:\n%s", reason, self.current.policy_hash[:12], exc)
                return ReloadOutcome(False, False, self.current.policy_hash, str(exc))
            new_hash = policy_hash(self.directory)
            self.last_error = None
            if new_hash == self.current.policy_hash:
                return ReloadOutcome(True, False, new_hash)
            old = self.current
            reused: dict[str, ReplicaSet[Upstream]] = {}
            fresh: dict[str, ReplicaSet[Upstream]] = {}
            for name, backend in policies.catalog.backends.items():
                previous = old.upstreams.get(name)
                urls = resolved_urls(name, backend, self.environ, self.url_overrides)
                if previous is not None and previous.backend == backend and [r.url for r in previous] == urls:
                    reused[name] = previous
                else:
                    fresh[name] = make_replicas(name, backend, self.environ, self.url_overrides, self.slot_source)
            upstreams = Upstreams({name: reused.get(name) or fresh[name] for name in policies.catalog.backends})
            self.current = Generation(policies, Router(policies.routing, policies.catalog), upstreams, new_hash, time.time())
            await self._monitor.stop()
            self._monitor.start(self._probe_targets(upstreams))
            await self._queues.stop()
            self._queues.start(upstreams)
            await self._discovery.stop()
            self._discovery.start(upstreams)
            for upstream in old.upstreams:
                if upstream.name not in reused:
                    self._spawn(self._retire(upstream))
            self.reloads["success"] += 1
            self._on_reload(True)
            log.info("policy reloaded (%s): %s -> %s", reason, old.policy_hash[:12], new_hash[:12])
            return ReloadOutcome(True, True, new_hash)

    def _replicas_changed(self, name: str, added: list[Upstream], removed: list[Upstream]) -> None:
        """Discovery changed a backend's replicas: probe the new ones, retire the gone ones."""
        self._spawn(self._restart_probes())
        for upstream in removed:
            self._spawn(self._retire(upstream))

    async def _restart_probes(self) -> None:
        await self._monitor.stop()
        self._monitor.start(self._probe_targets(self.current.upstreams))

    async def _reload_quietly(self, reason: str) -> None:
        await self.reload(reason)

    async def _watch(self) -> None:
        seen = _fingerprint(self.directory)
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = _fingerprint(self.directory)
            if now != seen:
                seen = now
                await self.reload("file change")

    async def _retire(self, upstream: Upstream) -> None:
        """Close a pool no generation uses any more, once its requests have finished."""
        self._retiring.append(upstream)
        deadline = time.monotonic() + RETIRE_MAX_WAIT_S
        transport = upstream.transport
        while transport is not None and (transport.in_use or transport.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        await upstream.aclose()
        self._retiring.remove(upstream)

    async def aclose(self) -> None:
        await self._discovery.stop()
        await self._monitor.stop()
        await self._queues.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.current.upstreams.aclose()
        for upstream in self._retiring:
            await upstream.aclose()
