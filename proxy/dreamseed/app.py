"""The Litestar application: OpenAI-compatible endpoints wired to routing and forwarding.

:class:`Proxy` holds what the process runs on (the policy generation in force, the retriever,
the scaler, the metrics) and is kept on ``app.state.proxy``; :meth:`Proxy.relay` is the
request path of every routed request, in one method. The route handlers below are thin: they
find the Proxy and call it. Admin routes live under one ``/admin`` router with one guard.

Handlers take the raw request and return ASGI responses directly: the body is decoded
once by msgspec, and the backend's answer is relayed without re-encoding. :class:`ProxyApp`
(at the end) takes POSTs to the relayed paths straight to :meth:`Proxy.relay`, past
Litestar's stack, which cost more than the relay itself (its docstring has the figures).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Router, delete, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, FromQuery
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive, Scope
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric

from . import __version__, slots
from .auth import KeyRing
from .backends import BackendState, backend_states
from .errors import (
    ProxyError,
    error_body,
    handle_http_exception,
    handle_proxy_error,
    handle_unexpected,
)
from .forwarding import FORWARDED_REQUEST_HEADERS, BufferedResponse, forward, raw_headers
from .metrics import Counts, Exchange, ProxyMetrics, log_exchange, state_metrics
from .openai_api import (
    EmbeddingRequest,
    Endpoint,
    IngestRequest,
    SearchRequest,
    decode_struct,
    parse_request,
    request_id,
    storable,
)
from .openapi import openapi_document
from .policy import AUTO_MODEL, Policies, RagSettings
from .rag.augment import augment, query_of
from .rag.ingest import ingest_texts
from .rag.retriever import Retriever
from .rag.store import hits_as_dicts
from .routing import UnknownModelError
from .runtime import Generation, Runtime
from .scaling import Coordinator, HostCoordinator, LocalCoordinator, PostgresCoordinator, Scaler
from .workers import (
    STATE_INTERVAL_S,
    SharedFiles,
    ask_parent_to_reload,
    merged_state,
    shared_directory,
)

AnyRequest = Request[Any, Any, Any]

log = logging.getLogger("dreamseed.app")

MAX_BODY_BYTES = 10 * 1024 * 1024
ADMIN_QUERY_TIMEOUT_S = 2.0


def _json(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> ASGIResponse:
    return ASGIResponse(
        body=msgspec.json.encode(data), status_code=status, media_type="application/json", headers=dict(headers or {})
    )


def _error(exc: ProxyError, headers: dict[str, str], exchange: Exchange) -> BufferedResponse:
    exchange.error = exc.code
    exchange.backend = exc.headers.get("x-dreamseed-backend", exchange.backend)
    return BufferedResponse(exc.status, raw_headers({"content-type": "application/json", **headers, **exc.headers}),
                            error_body(exc.message, type=exc.type, code=exc.code, param=exc.param), exchange)


async def read_body(receive: Receive, declared_length: int) -> bytes:
    """The request body, refusing more than MAX_BODY_BYTES (early, when Content-Length says so)."""
    if declared_length > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProxyError("client_disconnected", "the client disconnected while sending the request")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]  # litestar types it loosely
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large() -> ProxyError:
    return ProxyError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")


class Proxy:
    """The proxy's runtime: built by create_app, started and stopped by the app's lifespan."""

    def __init__(self, policies: Policies, environ: Mapping[str, str], url_overrides: Mapping[str, str],
                 log_prompts: bool, internal_port: int | None = None) -> None:
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
        self.embeddings_pending = 0
        self._rag_settings: dict[tuple[str, str, str], RagSettings] = {}
        self._openapi: dict[str, bytes] = {}

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "the proxy has not started"
        return self._runtime

    async def start(self, watch_policies: bool) -> None:
        policies = self.initial
        self._runtime = Runtime(policies, self.environ, self.url_overrides, on_reload=self.metrics.count_reload)
        await self._runtime.start(watch=watch_policies)
        if policies.rag.used:
            self._retriever = Retriever(policies.rag, self.environ)
            await self._retriever.start()  # a table built for another model stops the start here
        if policies.scale.backends:
            self.scaler = self._make_scaler(policies)
            await self.scaler.start()
        if self._shared is not None:
            self._sharing = asyncio.get_running_loop().create_task(self._share_state(self._shared))
        slots.listen(asyncio.get_running_loop())  # with --workers: slots other workers pass to ours

    async def aclose(self) -> None:
        slots.stop_listening(asyncio.get_running_loop())
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
        """Write this worker's counts and state gauges for the others, in a thread: a small file
        written and renamed took 0.9 ms (5 ms at P95) on the test machine's ext4, a stall of every
        request in flight when it ran on the event loop. The snapshot is numbered where it is
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

    def check_operator(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """/metrics on the main listener: open while it serves without client keys (loopback), the
        admin key once it has them; the internal listener serves Prometheus without a key."""
        if not self.internal(connection.scope) and not self.keys.clients_open:
            self.keys.check(_authorization(connection), "admin")

    def finished(self, exchange: Exchange) -> None:
        self.metrics.record(exchange)
        log_exchange(exchange)

    # --- the request path -------------------------------------------------------------

    async def relay(self, scope: Scope, receive: Receive, endpoint: Endpoint, path: str) -> ASGIApp:
        """Every routed request: authenticate, read and check the body, route, let the scaler
        prune the chain, retrieve context, forward along the chain."""
        # One pass over the raw ASGI headers: cheaper than building a Headers object.
        supplied_id: bytes | None = None
        authorization: bytes | None = None
        declared_length = -1
        passed_on: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                supplied_id = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                declared_length = int(value) if value.isdigit() else -1
            elif name in FORWARDED_REQUEST_HEADERS:
                passed_on.append((name, value))
        headers = {"x-request-id": request_id(supplied_id.decode("latin-1") if supplied_id is not None else None)}
        exchange = Exchange(headers["x-request-id"], endpoint, on_finish=self.finished)
        # The generation in force when the request arrived serves it to the end, reloads or not.
        generation = self.runtime.current
        try:
            self.keys.check(authorization, "client")
            body = await read_body(receive, declared_length)
            payload, prompt, stream = parse_request(body, endpoint)
            try:
                decision = generation.router.route(payload["model"], prompt)
            except UnknownModelError as exc:
                raise ProxyError(
                    "model_not_found",
                    f"The model {exc.model!r} does not exist. Available models: {', '.join(exc.available)}",
                    param="model",
                ) from None
            headers["x-dreamseed-rule"] = exchange.rule = decision.rule
            if self.log_prompts:
                exchange.prompt = prompt.text("all")
            if self.scaler is not None:  # no awaits on the hot path for features that are off
                decision = await self.scaler.prune_chain(decision, headers, exchange)
            settings = self.rag_settings(generation, decision.rule, decision.backend)
            headers["x-dreamseed-rag"] = await self.retrieve_into(payload, endpoint, settings, exchange) \
                if settings.enabled else "off"
            return await forward(generation.upstreams, decision, path, payload, stream, headers, passed_on, exchange)
        except ProxyError as exc:
            return _error(exc, headers, exchange)
        except Exception:
            # A fault of ours: logged once with the request id, answered in the OpenAI shape, and
            # counted (status 500, error internal_error) like every other answer.
            log.exception("internal error on request %s", headers["x-request-id"])
            return _error(ProxyError("internal_error", "internal error in the proxy"), headers, exchange)

    def rag_settings(self, generation: Generation, rule: str, backend: str) -> RagSettings:
        key = (generation.policy_hash, rule, backend)
        found = self._rag_settings.get(key)
        if found is None:
            if len(self._rag_settings) > 1024:  # old generations' entries
                self._rag_settings.clear()
            found = self._rag_settings[key] = generation.policies.rag.settings(rule, backend)
        return found

    async def retrieve_into(self, payload: dict[str, object], endpoint: Endpoint, settings: RagSettings,
                            exchange: Exchange) -> str:
        """Retrieve for a request whose settings enable it and add the context; returns the
        x-dreamseed-rag value."""
        query = query_of(payload, endpoint)
        found = self.retriever()
        if query is None or found is None:
            return "off"
        retrieval = await found.retrieve(settings, query)
        exchange.rag, exchange.rag_seconds = retrieval.outcome, retrieval.seconds
        if retrieval.outcome == "degraded":
            return "degraded"
        exchange.rag_hits = augment(payload, endpoint, settings, query, retrieval.hits)
        return f"hits={exchange.rag_hits}"

    # --- the other endpoints' work ------------------------------------------------------

    async def embeddings(self, request: AnyRequest) -> ASGIApp:
        self.keys.check(_authorization(request), "client")
        body = await read_body(request.receive, -1)
        wanted = decode_struct(body, EmbeddingRequest)
        storable(wanted.input, "input")
        found = self.retriever()
        configured = self.runtime.current.policies.rag.embedder.model if found is None else found.rag.embedder.model
        if wanted.model != configured:
            raise ProxyError("model_not_found",
                             f"The embedding model {wanted.model!r} does not exist. Available models: {configured}",
                             param="model")
        if found is None or found.embedder is None:
            problem = "retrieval is off in rag.yaml" if found is None else found.problem
            raise ProxyError("embeddings_unavailable", f"embeddings are unavailable: {problem}")
        embedder = found.embedder
        if wanted.dimensions is not None and wanted.dimensions != embedder.embedder.dim:
            raise ProxyError("invalid_dimensions", f"{configured} makes {embedder.embedder.dim}-dimensional vectors; "
                             f"`dimensions` {wanted.dimensions} is not available", param="dimensions")
        texts = [wanted.input] if isinstance(wanted.input, str) else wanted.input
        limits = found.rag.embedder
        counts = await asyncio.get_running_loop().run_in_executor(None, embedder.embedder.token_counts, texts)
        for index, count in enumerate(counts):
            if count > limits.max_input_tokens:
                where = "input" if isinstance(wanted.input, str) else f"input[{index}]"
                raise ProxyError("input_too_long", f"`{where}` is {count} tokens; {configured} takes at most "
                                 f"{limits.max_input_tokens} (rag.yaml embedder.max_input_tokens)", param=where)
        tokens = sum(counts)
        if tokens > limits.max_request_tokens:
            raise ProxyError("input_too_long", f"the inputs are {tokens} tokens in all; one request may have at most "
                             f"{limits.max_request_tokens} (rag.yaml embedder.max_request_tokens)", param="input")
        if self.embeddings_pending >= limits.max_pending:
            raise ProxyError("embeddings_busy", f"{self.embeddings_pending} embedding requests are already running "
                             "(rag.yaml embedder.max_pending); retry shortly", headers={"retry-after": "1"})
        self.embeddings_pending += 1
        try:
            if len(texts) == 1:
                vectors = [await embedder.embed_one(texts[0])]
            else:
                vectors = list(await embedder.embed_many(texts))
        except Exception as exc:  # noqa: BLE001 - the embedder's failure is a 503, not a 500
            log.warning("embedding failed: %s", exc)
            raise ProxyError("embeddings_unavailable", f"the embedder failed: {exc}") from None
        finally:
            self.embeddings_pending -= 1
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
                 if wanted.encoding_format == "base64" else vector.tolist()}
                for index, vector in enumerate(vectors)]
        return _json({"object": "list", "data": data, "model": configured,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

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


def proxy_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Proxy:
    proxy: Proxy = connection.app.state.proxy
    return proxy


# --- routes ------------------------------------------------------------------------------

# The routed endpoints: path -> (endpoint kind, the backend path they are forwarded to).
RELAYED: dict[str, tuple[Endpoint, str]] = {
    "/v1/chat/completions": ("chat", "/v1/chat/completions"),
    "/v1/completions": ("completions", "/v1/completions"),
}


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: AnyRequest) -> ASGIApp:
    return await proxy_of(request).relay(request.scope, request.receive, *RELAYED["/v1/chat/completions"])


@post("/v1/completions", status_code=200, summary="Create a text completion (OpenAI-compatible)")
async def completions(request: AnyRequest) -> ASGIApp:
    return await proxy_of(request).relay(request.scope, request.receive, *RELAYED["/v1/completions"])


@get("/v1/models", summary="List the models (backends) and 'auto'")
async def list_models(request: AnyRequest) -> ASGIApp:
    proxy = proxy_of(request)
    proxy.keys.check(_authorization(request), "client")
    catalog = proxy.runtime.current.policies.catalog
    data: list[dict[str, object]] = [
        {"id": AUTO_MODEL, "object": "model", "created": 0, "owned_by": "dreamseed",
         "description": "routed by policies/routing.yaml"}
    ]
    for name, backend in catalog.backends.items():
        data.append(
            {"id": name, "object": "model", "created": 0, "owned_by": "dreamseed", "root": backend.model,
             "max_model_len": backend.context_length, "on_demand": backend.on_demand}
        )
    return _json({"object": "list", "data": data})


@post("/v1/embeddings", status_code=200, summary="Create embeddings (OpenAI-compatible)")
async def embeddings(request: AnyRequest) -> ASGIApp:
    return await proxy_of(request).embeddings(request)


@get("/openapi.json", summary="This API's OpenAPI document", include_in_schema=False)
async def openapi_json(request: AnyRequest) -> ASGIApp:
    proxy = proxy_of(request)
    proxy.keys.check(_authorization(request), "client")  # it lists the models, as /v1/models does
    return BufferedResponse(200, [(b"content-type", b"application/json")], proxy.openapi())


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics_endpoint(request: AnyRequest) -> ASGIApp:
    proxy = proxy_of(request)
    proxy.check_operator(request)
    return BufferedResponse(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], await proxy.metrics_text())


@get("/healthz", summary="Liveness: the proxy process is serving")
async def healthz() -> ASGIApp:
    return _json({"status": "ok", "version": __version__})


@get("/readyz", summary="Readiness: a backend for the catch-all route is up")
async def readyz(request: AnyRequest) -> ASGIApp:
    proxy = proxy_of(request)
    backends = proxy.backend_states()
    # Ready when the catch-all rule (what "auto" traffic falls through to) can be served.
    ready = any(backends[name].state == "up" for name in proxy.runtime.current.router.rules[-1].chain)
    status = 200 if ready else 503
    # Any prober gets the answer; the backends' names and states only the internal listener, or a
    # client key once the main listener has keys. Error details name internal addresses and
    # actuators, so they stay behind the admin key (/admin/backends).
    if not proxy.internal(request.scope):
        try:
            proxy.keys.check(_authorization(request), "client")
        except ProxyError:
            return _json({"ready": ready}, status=status)
    states = {name: {"state": view.state, "circuit": view.circuit, "on_demand": view.on_demand}
              for name, view in backends.items()}
    return _json({"ready": ready, "backends": states}, status=status)


# --- admin routes (one guard: the admin key) ------------------------------------------------


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    proxy_of(connection).keys.check(_authorization(connection), "admin")


@get("/backends", summary="Backend states: health, circuit, in-flight and queued requests")
async def admin_backends(request: AnyRequest) -> ASGIApp:
    return _json({"backends": proxy_of(request).backend_states()})


@post("/backends/{name:str}/{action:str}", status_code=202, summary="Start or stop an on-demand backend (admin key)")
async def admin_backend_action(request: AnyRequest, name: FromPath[str], action: FromPath[str]) -> ASGIApp:
    proxy = proxy_of(request)
    scaler = proxy.scaler
    if action not in ("start", "stop"):
        raise ProxyError("not_found", f"unknown action {action!r}: use start or stop")
    if name not in proxy.runtime.current.policies.catalog.backends:
        raise ProxyError("backend_not_found", f"unknown backend {name!r}")
    if scaler is None or not scaler.manages(name):
        raise ProxyError("not_on_demand", f"backend {name!r} is not on-demand (scale.yaml): it is not started or "
                         "stopped by the proxy")
    log.info("admin API: %s %s", action, name)
    ok, detail = scaler.admin_start(name) if action == "start" else scaler.admin_stop(name)
    body = {"backend": name, "action": action, "accepted": ok, "detail": detail, **scaler.status(name)}
    return _json(body, status=202 if ok else 409)


@get("/policies", summary="The policy in force and the last reload attempt")
async def admin_policies(request: AnyRequest) -> ASGIApp:
    rt = proxy_of(request).runtime
    return _json({"directory": str(rt.directory), "policy_hash": rt.current.policy_hash,
                  "loaded_at": rt.current.loaded_at, "reloads": rt.reloads,
                  "last_attempt": rt.last_attempt, "last_error": rt.last_error})


@post("/policies/reload", status_code=200, summary="Validate the policy files and swap them in")
async def admin_reload(request: AnyRequest) -> ASGIApp:
    outcome = await proxy_of(request).runtime.reload("admin API")
    ask_parent_to_reload()  # with --workers, the other workers reload the same files too
    body = {"ok": outcome.ok, "changed": outcome.changed, "policy_hash": outcome.policy_hash, "error": outcome.error}
    return _json(body, status=200 if outcome.ok else 422)


@get("/rag", summary="RAG status and collections (admin key)")
async def admin_rag(request: AnyRequest) -> ASGIApp:
    found = proxy_of(request).retriever()
    if found is None:
        return _json({"enabled": False})
    status = {"enabled": True, **found.status()}
    if found.ready and found.store is not None:
        try:  # bounded: the admin view must answer while the database is down
            status["collections"] = await asyncio.wait_for(found.store.collections(), ADMIN_QUERY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the database went away (or the wait ran out): say so
            status["problem"] = f"{type(exc).__name__}: {exc}"
    return _json(status)


@post("/rag/ingest", status_code=200, summary="Add documents to a collection (admin key)")
async def admin_rag_ingest(request: AnyRequest) -> ASGIApp:
    wanted = decode_struct(await read_body(request.receive, -1), IngestRequest)
    storable(wanted.collection, "collection")
    for index, document in enumerate(wanted.documents):
        storable(document.source, f"documents[{index}].source")
        storable(document.text, f"documents[{index}].text")
        storable(document.metadata, f"documents[{index}].metadata")
    found = proxy_of(request).ready_retriever()
    assert found.store is not None and found.embedder is not None
    documents = [(d.source, d.text, d.metadata) for d in wanted.documents]
    summary = await ingest_texts(found.store, found.embedder, wanted.collection, documents, found.rag.chunking)
    return _json(summary.as_dict())


@post("/rag/search", status_code=200, summary="What retrieval finds for a query (admin key)")
async def admin_rag_search(request: AnyRequest) -> ASGIApp:
    wanted = decode_struct(await read_body(request.receive, -1), SearchRequest)
    storable(wanted.query, "query")
    storable(wanted.collection, "collection")
    proxy = proxy_of(request)
    found = proxy.ready_retriever()
    base = proxy.runtime.current.policies.rag.settings(wanted.rule or "", wanted.backend or "")
    settings = dataclasses.replace(base, collection=wanted.collection or base.collection, mode=wanted.mode or base.mode)
    hits = await found.search(settings, wanted.query, top_k=wanted.k)
    return _json({"collection": settings.collection, "mode": settings.mode, "hits": hits_as_dicts(hits)})


@delete("/rag/documents", status_code=200, summary="Delete a collection or a source (admin key)")
async def admin_rag_delete(request: AnyRequest, collection: FromQuery[str | None] = None,
                           source: FromQuery[str | None] = None) -> ASGIApp:
    if not collection and not source:
        raise ProxyError("invalid_request", "name a `collection`, a `source`, or both (query parameters)",
                         param="collection")
    storable(collection, "collection")
    storable(source, "source")
    found = proxy_of(request).ready_retriever()
    assert found.store is not None
    return _json({"deleted": await found.store.delete(collection or None, source or None)})


ADMIN = Router(path="/admin", guards=[admin_only], route_handlers=[
    admin_backends, admin_backend_action, admin_policies, admin_reload, admin_rag, admin_rag_ingest, admin_rag_search,
    admin_rag_delete])


def create_app(
    policies: Policies,
    *,
    environ: Mapping[str, str] | None = None,
    url_overrides: Mapping[str, str] | None = None,
    on_shutdown: Sequence[Callable[[], object]] = (),
    watch_policies: bool = True,
    log_prompts: bool = False,
    internal_port: int | None = None,
) -> Litestar:
    proxy = Proxy(policies, os.environ if environ is None else environ, url_overrides or {}, log_prompts,
                  internal_port)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await proxy.start(watch_policies)
        try:
            yield
        finally:
            await proxy.aclose()
            for hook in on_shutdown:
                hook()

    return ProxyApp(
        proxy,
        route_handlers=[chat_completions, completions, embeddings, list_models, openapi_json, metrics_endpoint, healthz,
                        readyz, ADMIN],
        lifespan=[lifespan],
        exception_handlers={
            ProxyError: handle_proxy_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=None,  # proxy/dreamseed/openapi.py builds the document from the request Structs
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,
        debug=False,
    )


# What the internal listener (`serve --metrics-port`) serves: Prometheus's scrape and the probes.
INTERNAL_PATHS = ("/metrics", "/healthz", "/readyz")


class ProxyApp(Litestar):
    """The Litestar app, with the relayed routes (POST to RELAYED's paths) taken straight to
    :meth:`Proxy.relay`.

    Measured reason: Litestar's middleware stack, router, request object and handler call cost
    about 60 us of CPU per request on the 2-core development machine (uvicorn serving a trivial
    Litestar handler: 88 us a request; the same answer from a bare ASGI function: 24 us), which was
    a third of the proxy's whole cost (benchmarks/README.md). The relay needs none of it: it reads
    the raw scope, answers its own errors in the OpenAI shape and returns an ASGI app. Every other
    route, and these paths in any other form (another method, a trailing slash), go through
    Litestar as usual, to the same handlers.
    """

    def __init__(self, proxy: Proxy, **config: Any) -> None:
        super().__init__(state=State({"proxy": proxy}), **config)
        self.proxy = proxy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.proxy.internal(scope) and scope["path"] not in INTERNAL_PATHS:
            refused = ProxyError("not_found", f"the internal listener serves {', '.join(INTERNAL_PATHS)} only")
            await ASGIResponse(body=error_body(refused.message, type=refused.type, code=refused.code),
                               status_code=refused.status, media_type="application/json")(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            relayed = RELAYED.get(scope["path"])
            if relayed is not None:
                response = await self.proxy.relay(scope, receive, *relayed)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _authorization(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
    for name, value in connection.scope["headers"]:
        if name == b"authorization":
            return value
    return None
