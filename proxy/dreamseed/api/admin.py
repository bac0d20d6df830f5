"""The admin API under /admin: backends, policies and RAG, all behind one guard (the admin key)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from litestar import Controller, delete, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, FromQuery
from litestar.types import ASGIApp

from ..errors import ProxyError
from ..openai_api import IngestRequest, SearchRequest, decode_struct, storable
from ..rag.ingest import ingest_texts
from ..rag.store import hits_as_dicts
from ..request_path import read_body
from ..workers import ask_parent_to_reload
from .common import AnyRequest, authorization, json_response, service_of

log = logging.getLogger("dreamseed.admin")

ADMIN_QUERY_TIMEOUT_S = 2.0


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    service_of(connection).keys.check(authorization(connection), "admin")


class AdminController(Controller):
    path = "/admin"
    guards = [admin_only]

    @get("/backends", summary="Backend states: health, circuit, in-flight and queued requests")
    async def backends(self, request: AnyRequest) -> ASGIApp:
        return json_response({"backends": service_of(request).backend_states()})

    @post("/backends/{name:str}/{action:str}", status_code=202, summary="Start or stop an on-demand backend (admin key)")
    async def backend_action(self, request: AnyRequest, name: FromPath[str], action: FromPath[str]) -> ASGIApp:
        service = service_of(request)
        scaler = service.scaler
        if action not in ("start", "stop"):
            raise ProxyError("not_found", f"unknown action {action!r}: use start or stop")
        if name not in service.runtime.current.policies.catalog.backends:
            raise ProxyError("backend_not_found", f"unknown backend {name!r}")
        if scaler is None or not scaler.manages(name):
            raise ProxyError("not_on_demand", f"backend {name!r} is not on-demand (scale.yaml): it is not started or "
                             "stopped by the proxy")
        log.info("admin API: %s %s", action, name)
        ok, detail = scaler.admin_start(name) if action == "start" else scaler.admin_stop(name)
        body = {"backend": name, "action": action, "accepted": ok, "detail": detail, **scaler.status(name)}
        return json_response(body, status=202 if ok else 409)

    @get("/policies", summary="The policy in force and the last reload attempt")
    async def policies(self, request: AnyRequest) -> ASGIApp:
        rt = service_of(request).runtime
        return json_response({"directory": str(rt.directory), "policy_hash": rt.current.policy_hash,
                              "loaded_at": rt.current.loaded_at, "reloads": rt.reloads,
                              "last_attempt": rt.last_attempt, "last_error": rt.last_error})

    @post("/policies/reload", status_code=200, summary="Validate the policy files and swap them in")
    async def reload(self, request: AnyRequest) -> ASGIApp:
        outcome = await service_of(request).runtime.reload("admin API")
        ask_parent_to_reload()  # with --workers, the other workers reload the same files too
        body = {"ok": outcome.ok, "changed": outcome.changed, "policy_hash": outcome.policy_hash, "error": outcome.error}
        return json_response(body, status=200 if outcome.ok else 422)

    @get("/rag", summary="RAG status and collections (admin key)")
    async def rag(self, request: AnyRequest) -> ASGIApp:
        found = service_of(request).retriever()
        if found is None:
            return json_response({"enabled": False})
        status = {"enabled": True, **found.status()}
        if found.ready and found.store is not None:
            try:  # bounded: the admin view must answer while the database is down
                status["collections"] = await asyncio.wait_for(found.store.collections(), ADMIN_QUERY_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the database went away (or the wait ran out): say so
                status["problem"] = f"{type(exc).__name__}: {exc}"
        return json_response(status)

    @post("/rag/ingest", status_code=200, summary="Add documents to a collection (admin key)")
    async def rag_ingest(self, request: AnyRequest) -> ASGIApp:
        wanted = decode_struct(await read_body(request.receive, -1), IngestRequest)
        storable(wanted.collection, "collection")
        for index, document in enumerate(wanted.documents):
            storable(document.source, f"documents[{index}].source")
            storable(document.text, f"documents[{index}].text")
            storable(document.metadata, f"documents[{index}].metadata")
        found = service_of(request).ready_retriever()
        assert found.store is not None and found.embedder is not None
        documents = [(d.source, d.text, d.metadata) for d in wanted.documents]
        summary = await ingest_texts(found.store, found.embedder, wanted.collection, documents, found.rag.chunking)
        return json_response(summary.as_dict())

    @post("/rag/search", status_code=200, summary="What retrieval finds for a query (admin key)")
    async def rag_search(self, request: AnyRequest) -> ASGIApp:
        wanted = decode_struct(await read_body(request.receive, -1), SearchRequest)
        storable(wanted.query, "query")
        storable(wanted.collection, "collection")
        service = service_of(request)
        found = service.ready_retriever()
        base = service.runtime.current.policies.rag.settings(wanted.rule or "", wanted.backend or "")
        settings = dataclasses.replace(base, collection=wanted.collection or base.collection, mode=wanted.mode or base.mode)
        hits = await found.search(settings, wanted.query, top_k=wanted.k)
        return json_response({"collection": settings.collection, "mode": settings.mode, "hits": hits_as_dicts(hits)})

    @delete("/rag/documents", status_code=200, summary="Delete a collection or a source (admin key)")
    async def rag_delete(self, request: AnyRequest, collection: FromQuery[str | None] = None,
                               source: FromQuery[str | None] = None) -> ASGIApp:
        if not collection and not source:
            raise ProxyError("invalid_request", "name a `collection`, a `source`, or both (query parameters)",
                             param="collection")
        storable(collection, "collection")
        storable(source, "source")
        found = service_of(request).ready_retriever()
        assert found.store is not None
        return json_response({"deleted": await found.store.delete(collection or None, source or None)})
