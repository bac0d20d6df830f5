"""The Litestar application: OpenAI-compatible endpoints wired to routing and forwarding.

Handlers take the raw request and return ASGI responses directly: the body is decoded
once by msgspec, and the backend's answer is relayed without re-encoding.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, delete, get, post
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, Receive
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import Metric

from . import __version__
from .auth import KeyRing
from .backends import Upstreams
from .errors import (
    ProxyError,
    error_body,
    handle_http_exception,
    handle_proxy_error,
    handle_unexpected,
)
from .forwarding import FORWARDED_REQUEST_HEADERS, BufferedResponse, forward, raw_headers
from .metrics import Exchange, ProxyMetrics, log_exchange, state_metrics
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
from .rag.retriever import Retriever
from .routing import Decision, UnknownModelError
from .runtime import Generation, Runtime
from .scaling import LocalCoordinator, PostgresCoordinator, Scaler

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
            raise ProxyError(400, "the client disconnected while sending the request", type="invalid_request_error",
                             code="client_disconnected")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]  # litestar types it loosely
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large() -> ProxyError:
    return ProxyError(413, f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB",
                      type="invalid_request_error", code="request_too_large")


def create_app(
    policies: Policies,
    *,
    environ: Mapping[str, str] | None = None,
    url_overrides: Mapping[str, str] | None = None,
    on_shutdown: Sequence[Callable[[], object]] = (),
    watch_policies: bool = True,
    log_prompts: bool = False,
) -> Litestar:
    environ = os.environ if environ is None else environ
    keys = KeyRing.from_environment(environ)
    holder: dict[str, Runtime] = {}
    # The retriever (RAG store + embedder) exists once some policy turns retrieval on; its
    # embedder and store settings are those of that moment (changing them needs a restart).
    rag: dict[str, Retriever] = {}
    # On-demand backends (scale.yaml), set up at start like the retriever.
    scaling: dict[str, Scaler] = {}
    starting: set[asyncio.Task[None]] = set()  # keeps background start-ups referenced

    def runtime() -> Runtime:
        return holder["runtime"]

    def retriever() -> Retriever | None:
        found = rag.get("retriever")
        if found is None and runtime().current.policies.rag.used:
            # Turned on by a reload: come up in the background; requests degrade until ready.
            found = rag["retriever"] = Retriever(runtime().current.policies.rag, environ)
            starting.add(asyncio.get_running_loop().create_task(found.start()))
        return found

    def current_state() -> Iterator[Metric]:
        if "runtime" not in holder:
            return iter(())
        rt = holder["runtime"]
        return state_metrics(backend_states(rt.current.upstreams, scaling.get("scaler")), rt.current.policy_hash)

    metrics = ProxyMetrics(current_state)

    def finished(exchange: Exchange) -> None:
        metrics.record(exchange)
        log_exchange(exchange)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        holder["runtime"] = Runtime(policies, environ, url_overrides or {}, on_reload=metrics.count_reload)
        await holder["runtime"].start(watch=watch_policies)
        if policies.rag.used:
            rag["retriever"] = Retriever(policies.rag, environ)
            await rag["retriever"].start()  # a table built for another model stops the start here
        if policies.scale.backends:
            scaling["scaler"] = make_scaler(policies)
            await scaling["scaler"].start()
        try:
            yield
        finally:
            if "scaler" in scaling:
                await scaling["scaler"].aclose()
            await holder["runtime"].aclose()
            if "retriever" in rag:
                await rag["retriever"].aclose()
            for hook in on_shutdown:
                hook()

    def make_scaler(policies: Policies) -> Scaler:
        # Proxy processes that share a database coordinate starts and stops through it.
        found = rag.get("retriever")
        url = environ.get("DATABASE_URL") or (found.database.url if found and found.database else None)
        coordinator = PostgresCoordinator(url) if url else LocalCoordinator()
        if url is None:
            log.info("on-demand backends: no database, so no coordination with other proxy processes")
        return Scaler(policies.scale, policies.catalog, lambda name: runtime().current.upstreams.get(name),
                      coordinator, on_event=metrics.count_scaler_event)

    async def cold_start(decision: Decision, headers: dict[str, str], exchange: Exchange) -> Decision:
        """On-demand backends in the chain: forward when ready; otherwise hold the request while
        its start runs (`wait`) or skip to the fallback (`fallback`), saying which in the headers."""
        scaler = scaling.get("scaler")
        if scaler is None:
            return decision
        kept: list[str] = []
        refused: str | None = None
        for position, name in enumerate(decision.chain):
            if not scaler.manages(name):
                kept.append(name)
                continue
            if position == 0:
                verdict, waited = await scaler.admit(name, keyword=decision.keyword)
                if verdict.action == "forward":
                    if waited:
                        headers["x-dreamseed-cold-start"] = f"waited {waited:.2f}s"
                    kept.append(name)
                    continue
                headers["x-dreamseed-cold-start"] = "fallback"
                exchange.fallbacks.append(f"{name}:{verdict.reason}")
                refused = refused or scaler.machines[name].last_error
            elif scaler.machines[name].state == "ready":
                kept.append(name)
            else:
                exchange.fallbacks.append(f"{name}:{scaler.machines[name].state}")
        if not kept:
            skipped = ", ".join(exchange.fallbacks)
            raise ProxyError(503, f"no backend can take the request now ({skipped})" + (f": {refused}" if refused else ""),
                             type="server_error", code="backend_not_running",
                             headers={**headers, "x-dreamseed-fallback": skipped, "retry-after": "10"})
        if len(kept) == len(decision.chain):
            return decision
        return Decision(decision.rule, tuple(kept), decision.reason, decision.keyword)

    async def relay(request: AnyRequest, endpoint: Endpoint, path: str) -> ASGIApp:
        # One pass over the raw ASGI headers: cheaper than building a Headers object.
        supplied_id: bytes | None = None
        authorization: bytes | None = None
        declared_length = -1
        passed_on: list[tuple[bytes, bytes]] = []
        for name, value in request.scope["headers"]:
            if name == b"x-request-id":
                supplied_id = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                declared_length = int(value) if value.isdigit() else -1
            elif name in FORWARDED_REQUEST_HEADERS:
                passed_on.append((name, value))
        headers = {"x-request-id": request_id(supplied_id.decode("latin-1") if supplied_id is not None else None)}
        exchange = Exchange(headers["x-request-id"], endpoint, on_finish=finished)
        # The generation in force when the request arrived serves it to the end, reloads or not.
        generation = runtime().current
        try:
            keys.check(authorization, "client")
            body = await read_body(request.receive, declared_length)
            payload, prompt, stream = parse_request(body, endpoint)
            try:
                decision = generation.router.route(payload["model"], prompt)
            except UnknownModelError as exc:
                raise ProxyError(
                    404,
                    f"The model {exc.model!r} does not exist. Available models: {', '.join(exc.available)}",
                    type="invalid_request_error",
                    code="model_not_found",
                    param="model",
                ) from None
            headers["x-dreamseed-rule"] = exchange.rule = decision.rule
            if log_prompts:
                exchange.prompt = prompt.text("all")
            if scaling:  # no awaits on the hot path for features that are off
                decision = await cold_start(decision, headers, exchange)
            settings = rag_settings(generation, decision.rule, decision.backend)
            headers["x-dreamseed-rag"] = await retrieve_into(payload, endpoint, settings, exchange) \
                if settings.enabled else "off"
            return await forward(generation.upstreams, decision, path, payload, stream, headers, passed_on, exchange)
        except ProxyError as exc:
            return _error(exc, headers, exchange)

    settings_cache: dict[tuple[str, str, str], RagSettings] = {}

    def rag_settings(generation: Generation, rule: str, backend: str) -> RagSettings:
        key = (generation.policy_hash, rule, backend)
        found = settings_cache.get(key)
        if found is None:
            if len(settings_cache) > 1024:  # old generations' entries
                settings_cache.clear()
            found = settings_cache[key] = generation.policies.rag.settings(rule, backend)
        return found

    async def retrieve_into(payload: dict[str, object], endpoint: Endpoint, settings: RagSettings,
                            exchange: Exchange) -> str:
        """Retrieve for a request whose settings enable it and add the context; returns the
        x-dreamseed-rag value."""
        query = query_of(payload, endpoint)
        found = retriever()
        if query is None or found is None:
            return "off"
        retrieval = await found.retrieve(settings, query)
        exchange.rag, exchange.rag_seconds = retrieval.outcome, retrieval.seconds
        if retrieval.outcome == "degraded":
            return "degraded"
        exchange.rag_hits = augment(payload, endpoint, settings, query, retrieval.hits)
        return f"hits={exchange.rag_hits}"

    @post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
    async def chat_completions(request: AnyRequest) -> ASGIApp:
        return await relay(request, "chat", "/v1/chat/completions")

    @post("/v1/completions", status_code=200, summary="Create a text completion (OpenAI-compatible)")
    async def completions(request: AnyRequest) -> ASGIApp:
        return await relay(request, "completions", "/v1/completions")

    @get("/v1/models", summary="List the models (backends) and 'auto'")
    async def list_models(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "client")
        catalog = runtime().current.policies.catalog
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

    embedding_requests = {"pending": 0}

    @post("/v1/embeddings", status_code=200, summary="Create embeddings (OpenAI-compatible)")
    async def embeddings(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "client")
        body = await read_body(request.receive, -1)
        wanted = decode_struct(body, EmbeddingRequest)
        storable(wanted.input, "input")
        found = retriever()
        configured = runtime().current.policies.rag.embedder.model if found is None else found.rag.embedder.model
        if wanted.model != configured:
            raise ProxyError(404, f"The embedding model {wanted.model!r} does not exist. Available models: {configured}",
                             type="invalid_request_error", code="model_not_found", param="model")
        if found is None or found.embedder is None:
            problem = "retrieval is off in rag.yaml" if found is None else found.problem
            raise ProxyError(503, f"embeddings are unavailable: {problem}", type="server_error",
                             code="embeddings_unavailable")
        embedder = found.embedder
        if wanted.dimensions is not None and wanted.dimensions != embedder.embedder.dim:
            raise ProxyError(400, f"{configured} makes {embedder.embedder.dim}-dimensional vectors; "
                                  f"`dimensions` {wanted.dimensions} is not available", type="invalid_request_error",
                             code="invalid_dimensions", param="dimensions")
        texts = [wanted.input] if isinstance(wanted.input, str) else wanted.input
        if embedding_requests["pending"] >= found.rag.embedder.max_pending:
            raise ProxyError(429, f"{embedding_requests['pending']} embedding requests are already running "
                                  "(rag.yaml embedder.max_pending); retry shortly", type="rate_limit_error",
                             code="embeddings_busy", headers={"retry-after": "1"})
        embedding_requests["pending"] += 1
        try:
            if len(texts) == 1:
                vectors = [await embedder.embed_one(texts[0])]
            else:
                vectors = list(await embedder.embed_many(texts))
            tokens = await asyncio.get_running_loop().run_in_executor(None, embedder.embedder.count_tokens, texts)
        except Exception as exc:  # noqa: BLE001 - the embedder's failure is a 503, not a 500
            log.warning("embedding failed: %s", exc)
            raise ProxyError(503, f"the embedder failed: {exc}", type="server_error",
                             code="embeddings_unavailable") from None
        finally:
            embedding_requests["pending"] -= 1
        data = [{"object": "embedding", "index": index,
                 "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
                 if wanted.encoding_format == "base64" else vector.tolist()}
                for index, vector in enumerate(vectors)]
        return _json({"object": "list", "data": data, "model": configured,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def ready_retriever() -> Retriever:
        found = retriever()
        if found is None:
            raise ProxyError(409, "retrieval is off: no rule, backend or default in rag.yaml enables it",
                             type="invalid_request_error", code="rag_disabled")
        if not found.ready:
            raise ProxyError(503, f"the RAG store is unavailable: {found.problem}", type="server_error",
                             code="rag_unavailable")
        return found

    @get("/admin/rag", summary="RAG status and collections (admin key)")
    async def admin_rag(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        found = retriever()
        if found is None:
            return _json({"enabled": False})
        status = {"enabled": True, **found.status()}
        if found.ready and found.store is not None:
            try:  # bounded: the admin view must answer while the database is down
                status["collections"] = await asyncio.wait_for(found.store.collections(), ADMIN_QUERY_TIMEOUT_S)
            except (TimeoutError, Exception) as exc:  # noqa: BLE001 - the database went away: say so
                status["problem"] = f"{type(exc).__name__}: {exc}"
        return _json(status)

    @post("/admin/rag/ingest", status_code=200, summary="Add documents to a collection (admin key)")
    async def admin_rag_ingest(request: AnyRequest) -> ASGIApp:
        from .rag.ingest import ingest_texts

        keys.check(_authorization(request), "admin")
        wanted = decode_struct(await read_body(request.receive, -1), IngestRequest)
        storable(wanted.collection, "collection")
        for index, document in enumerate(wanted.documents):
            storable(document.source, f"documents[{index}].source")
            storable(document.text, f"documents[{index}].text")
            storable(document.metadata, f"documents[{index}].metadata")
        found = ready_retriever()
        assert found.store is not None and found.embedder is not None
        documents = [(d.source, d.text, d.metadata) for d in wanted.documents]
        summary = await ingest_texts(found.store, found.embedder, wanted.collection, documents, found.rag.chunking)
        return _json(summary.as_dict())

    @post("/admin/rag/search", status_code=200, summary="What retrieval finds for a query (admin key)")
    async def admin_rag_search(request: AnyRequest) -> ASGIApp:
        from .rag.store import hits_as_dicts

        keys.check(_authorization(request), "admin")
        wanted = decode_struct(await read_body(request.receive, -1), SearchRequest)
        storable(wanted.query, "query")
        storable(wanted.collection, "collection")
        found = ready_retriever()
        base = runtime().current.policies.rag.settings(wanted.rule or "", wanted.backend or "")
        settings = dataclasses.replace(base, collection=wanted.collection or base.collection,
                                       mode=wanted.mode or base.mode)
        hits = await found.search(settings, wanted.query, top_k=wanted.k)
        return _json({"collection": settings.collection, "mode": settings.mode, "hits": hits_as_dicts(hits)})

    @delete("/admin/rag/documents", status_code=200, summary="Delete a collection or a source (admin key)")
    async def admin_rag_delete(request: AnyRequest, collection: str | None = None, source: str | None = None) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        if not collection and not source:
            raise ProxyError(400, "name a `collection`, a `source`, or both (query parameters)",
                             type="invalid_request_error", code="invalid_request", param="collection")
        storable(collection, "collection")
        storable(source, "source")
        found = ready_retriever()
        assert found.store is not None
        return _json({"deleted": await found.store.delete(collection or None, source or None)})

    documents: dict[str, bytes] = {}

    @get("/openapi.json", summary="This API's OpenAPI document", include_in_schema=False)
    async def openapi_json() -> ASGIApp:
        generation = runtime().current
        document = documents.get(generation.policy_hash)
        if document is None:
            documents.clear()
            document = documents[generation.policy_hash] = msgspec.json.encode(
                openapi_document(generation.router.available_models(), generation.policies.rag.embedder.model))
        return BufferedResponse(200, [(b"content-type", b"application/json")], document)

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics_endpoint() -> ASGIApp:
        return BufferedResponse(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                                generate_latest(metrics.registry))

    @get("/healthz", summary="Liveness: the proxy process is serving")
    async def healthz() -> ASGIApp:
        return _json({"status": "ok", "version": __version__})

    @get("/readyz", summary="Readiness: a backend for the catch-all route is up")
    async def readyz() -> ASGIApp:
        generation = runtime().current
        backends = backend_states(generation.upstreams, scaling.get("scaler"))
        # Ready when the catch-all rule (what "auto" traffic falls through to) can be served.
        ready = any(backends[name]["state"] == "up" for name in generation.router.rules[-1].chain)
        return _json({"ready": ready, "backends": backends}, status=200 if ready else 503)

    @get("/admin/backends", summary="Backend states: health, circuit, in-flight and queued requests")
    async def admin_backends(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        return _json({"backends": backend_states(runtime().current.upstreams, scaling.get("scaler"))})

    @post("/admin/backends/{name:str}/{action:str}", status_code=202,
          summary="Start or stop an on-demand backend (admin key)")
    async def admin_backend_action(request: AnyRequest, name: str, action: str) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        scaler = scaling.get("scaler")
        if action not in ("start", "stop"):
            raise ProxyError(404, f"unknown action {action!r}: use start or stop", type="invalid_request_error",
                             code="not_found")
        if name not in runtime().current.policies.catalog.backends:
            raise ProxyError(404, f"unknown backend {name!r}", type="invalid_request_error", code="backend_not_found")
        if scaler is None or not scaler.manages(name):
            raise ProxyError(409, f"backend {name!r} is not on-demand (scale.yaml): it is not started or stopped "
                                  "by the proxy", type="invalid_request_error", code="not_on_demand")
        log.info("admin API: %s %s", action, name)
        ok, detail = scaler.admin_start(name) if action == "start" else scaler.admin_stop(name)
        body = {"backend": name, "action": action, "accepted": ok, "detail": detail, **scaler.status(name)}
        return _json(body, status=202 if ok else 409)

    @get("/admin/policies", summary="The policy in force and the last reload attempt")
    async def admin_policies(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        rt = runtime()
        return _json({"directory": str(rt.directory), "policy_hash": rt.current.policy_hash,
                      "loaded_at": rt.current.loaded_at, "reloads": rt.reloads,
                      "last_attempt": rt.last_attempt, "last_error": rt.last_error})

    @post("/admin/policies/reload", status_code=200, summary="Validate the policy files and swap them in")
    async def admin_reload(request: AnyRequest) -> ASGIApp:
        keys.check(_authorization(request), "admin")
        outcome = await runtime().reload("admin API")
        body = {"ok": outcome.ok, "changed": outcome.changed, "policy_hash": outcome.policy_hash,
                "error": outcome.error}
        return _json(body, status=200 if outcome.ok else 422)

    return Litestar(
        route_handlers=[chat_completions, completions, embeddings, list_models, openapi_json, metrics_endpoint, healthz,
                        readyz, admin_backends, admin_backend_action, admin_policies, admin_reload, admin_rag, admin_rag_ingest,
                        admin_rag_search, admin_rag_delete],
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


def _authorization(request: AnyRequest) -> bytes | None:
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            return value
    return None


def backend_states(upstreams: Upstreams, scaler: Scaler | None = None) -> dict[str, dict[str, object]]:
    """Each backend's state as the health checks see it: up, down (circuit open or half-open,
    or the last probe failed), unknown (not probed yet) or unavailable (not configured)."""
    states: dict[str, dict[str, object]] = {}
    for upstream in upstreams:
        circuit = upstream.circuit
        if circuit is None:
            state, detail = "unavailable", upstream.unavailable
        elif not circuit.probed:
            state, detail = "unknown", None
        else:
            state = "up" if circuit.state == "closed" and circuit.last_error is None else "down"
            detail = circuit.last_error
        states[upstream.name] = {"state": state, "circuit": circuit.state if circuit else None, "detail": detail,
                                 "on_demand": upstream.backend.on_demand,
                                 "in_flight": upstream.transport.in_use if upstream.transport else 0,
                                 "queued": upstream.transport.waiting if upstream.transport else 0}
        if scaler is not None and scaler.manages(upstream.name):
            states[upstream.name]["scaler"] = scaler.status(upstream.name)
            if scaler.machines[upstream.name].state != "ready":
                states[upstream.name]["state"] = scaler.machines[upstream.name].state
    return states
