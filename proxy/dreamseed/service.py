"""The running proxy (:class:`Service`): what one process serves with, from start to stop.

It holds the policy generation in force (runtime.py), the retriever once a policy turns retrieval
on, the scaler of on-demand backends, the metrics (shared with the other workers under
`serve --workers`), and the request path (request_path/) that serves routed requests with them.
The ASGI app (asgi.py) and the Litestar handlers (api/) reach it through ``app.state.service``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator, Mapping

import msgspec
from litestar.types import Scope
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from .auth import KeyRing
from .errors import ProxyError
from .exchange import Exchange
from .metrics import Counts, ProxyMetrics, log_exchange, state_metrics
from .openapi import openapi_document
from .policy import Policies
from .rag.retriever import Retriever
from .request_path import RequestPath
from .runtime import Runtime
from .scaling import Coordinator, HostCoordinator, LocalCoordinator, PostgresCoordinator, Scaler
from .slots import WorkerSlots
from .states import BackendState, backend_states
from .workers import STATE_INTERVAL_S, SharedFiles, merged_state, shared_directory

log = logging.getLogger("dreamseed.service")


class Service:
    """The running proxy: built by asgi.create_app, started and stopped by the app's lifespan."""

    def __init__(self, policies: Policies, environ: Mapping[str, str], url_overrides: Mapping[str, str],
                 log_prompts: bool, internal_port: int | None = None, slots: WorkerSlots | None = None) -> None:
        self.initial = policies
        # `serve --metrics-port`: the listener for Prometheus and probes, never published.
        self.internal_port = internal_port
        self.environ = environ
        self.url_overrides = url_overrides
        self.log_prompts = log_prompts
        self.keys = KeyRing.from_environment(environ)
        self.metrics = ProxyMetrics(self._state_metrics)
        self._runtime: Runtime | None = None
        # The retriever (RAG store + embedder) exists once some policy turns retrieval on; its
        # embedder and store settings are those of that moment (changing them needs a restart).
        self._retriever: Retriever | None = None
        self.scaler: Scaler | None = None  # on-demand backends (scale.yaml), set up at start
        self._starting: set[asyncio.Task[None]] = set()  # keeps background start-ups referenced
        # With --workers: this worker's counts and state for the others' /metrics (made in the worker).
        directory = shared_directory(environ)
        self._shared = SharedFiles(directory) if directory is not None else None
        self._sharing: asyncio.Task[None] | None = None
        self._snapshots = itertools.count()  # numbers the shared snapshots, in the order they are taken
        self.embeddings_pending = 0  # /v1/embeddings requests being embedded now
        self._openapi: dict[str, bytes] = {}
        self.slots = slots  # with --workers: this worker's share of the backends' slots (slots.py)
        self.request_path = RequestPath(self)

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "the proxy has not started"
        return self._runtime

    async def start(self, watch_policies: bool) -> None:
        policies = self.initial
        self._runtime = Runtime(policies, self.environ, self.url_overrides, on_reload=self.metrics.count_reload,
                                slot_source=self.slots.counter if self.slots is not None else None)
        await self._runtime.start(watch=watch_policies)
        if policies.rag.used:
            self._retriever = Retriever(policies.rag, self.environ)
            await self._retriever.start()  # a table built for another model stops the start here
        if policies.scale.backends:
            self.scaler = self._make_scaler(policies)
            await self.scaler.start()
        if self._shared is not None:
            self._sharing = asyncio.get_running_loop().create_task(self._share_state(self._shared))
        if self.slots is not None:
            self.slots.listen(asyncio.get_running_loop())  # slots other workers pass to ours

    async def aclose(self) -> None:
        if self.slots is not None:
            self.slots.stop_listening(asyncio.get_running_loop())
        if self._sharing is not None and self._shared is not None:
            self._sharing.cancel()
            await self._share(self._shared)  # this worker's last counts stay in the others' sums
        if self.scaler is not None:
            await self.scaler.aclose()
        if self._runtime is not None:
            await self._runtime.aclose()
        if self._retriever is not None:
            await self._retriever.aclose()

    def _make_scaler(self, policies: Policies) -> Scaler:
        # Proxy processes that share a database coordinate starts and stops through it.
        found = self._retriever
        url = self.environ.get("DATABASE_URL") or (found.database.url if found and found.database else None)
        # Workers of one `serve --workers N` without one coordinate through their shared directory.
        shared = shared_directory(self.environ)
        coordinator: Coordinator = (PostgresCoordinator(url) if url else HostCoordinator(shared) if shared
                                    else LocalCoordinator())
        if url is None:
            log.info("on-demand backends: no database, so no coordination with proxy processes of other serves")
        return Scaler(policies.scale, policies.catalog, lambda name: self.runtime.current.upstreams.get(name),
                      coordinator, on_event=self.metrics.count_scaler_event)

    def retriever(self) -> Retriever | None:
        found = self._retriever
        if found is None and self.runtime.current.policies.rag.used:
            # Turned on by a reload: come up in the background; requests degrade until ready.
            found = self._retriever = Retriever(self.runtime.current.policies.rag, self.environ)
            self._starting.add(asyncio.get_running_loop().create_task(found.start()))
        return found

    def backend_states(self) -> dict[str, BackendState]:
        return backend_states(self.runtime.current.upstreams, self.scaler)

    def _state_metrics(self) -> Iterator[Metric]:
        if self._runtime is None:
            return iter(())
        return state_metrics(self.backend_states(), self._runtime.current.policy_hash)

    async def metrics_text(self) -> bytes:
        """The /metrics page: this process's figures, or with --workers all workers' figures as one."""
        shared = self._shared
        if shared is None:
            return generate_latest(self.metrics.registry)
        # This worker's counts are shared before they are shown: a page adding its live counts to the
        # others' last shared ones would be ahead of the next page another worker answers, and a
        # counter that goes back reads to Prometheus as a restart. So every page shows each worker's
        # latest shared counts, which only grow.
        counts, state = await self._share(shared)
        return await asyncio.to_thread(self._page_across_workers, shared, counts, state)

    def _page_across_workers(self, shared: SharedFiles, counts: Counts, state: list[Metric]) -> bytes:
        """Off the event loop: the other workers' files read, everything added up and written out."""
        return generate_latest(self.metrics.registry_of([counts, *shared.others_counts()],
                                                        merged_state(shared.directory, state)))

    async def _share_state(self, shared: SharedFiles) -> None:
        """With --workers: share this worker's counts and its in-flight and queued requests every
        second, for the others' /metrics."""
        while True:
            await self._share(shared)
            await asyncio.sleep(STATE_INTERVAL_S)

    async def _share(self, shared: SharedFiles) -> tuple[Counts, list[Metric]]:
        """Write this worker's counts and state gauges for the others, in a thread: file I/O on the
        event loop would stall every request in flight. The snapshot is numbered where it is
        taken, so a slower write of an older one never replaces a newer one."""
        counts, state = self.metrics.snapshot(), list(self._state_metrics())
        try:
            await asyncio.to_thread(shared.share, counts, state, next(self._snapshots))
        except OSError as exc:
            log.warning("cannot share this worker's metrics in %s: %s", shared.directory, exc)
        return counts, state

    def internal(self, scope: Scope) -> bool:
        """Whether the request came in on the internal listener (`serve --metrics-port`)."""
        server = scope.get("server")
        return self.internal_port is not None and server is not None and server[1] == self.internal_port

    def check_operator(self, scope: Scope, authorization: bytes | None) -> None:
        """/metrics on the main listener: open while it serves without client keys (loopback), the
        admin key once it has them; the internal listener serves Prometheus without a key."""
        if not self.internal(scope) and not self.keys.clients_open:
            self.keys.check(authorization, "admin")

    def finished(self, exchange: Exchange) -> None:
        self.metrics.record(exchange)
        log_exchange(exchange)

    def ready_retriever(self) -> Retriever:
        found = self.retriever()
        if found is None:
            raise ProxyError("rag_disabled", "retrieval is off: no rule, backend or default in rag.yaml enables it")
        if not found.ready:
            raise ProxyError("rag_unavailable", f"the RAG store is unavailable: {found.problem}")
        return found

    def openapi(self) -> bytes:
        generation = self.runtime.current
        document = self._openapi.get(generation.policy_hash)
        if document is None:
            self._openapi.clear()
            document = self._openapi[generation.policy_hash] = msgspec.json.encode(
                openapi_document(generation.router.available_models(), generation.policies.rag.embedder.model))
        return document
