"""The proxy's OpenAPI document, served at /openapi.json.

Built from the same msgspec Structs that check request bodies (proxy/dreamseed/openai_api.py), so the
document cannot drift from what the proxy accepts. (The relay handlers take the raw request to
avoid decoding bodies twice, which leaves Litestar's generator nothing to describe.) The
`model` enum lists what the running policy serves, like GET /v1/models.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from .errors import ERRORS
from .openai_api import ChatRequest, CompletionRequest, EmbeddingRequest, IngestRequest, SearchRequest


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None  # a backend's numeric codes are not passed on (request_path/backend_errors.py)


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def errors(*codes: str) -> dict[str, Any]:
    """Error responses for these codes (errors.ERRORS), grouped by status, each described by its
    codes and when they happen."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(ERRORS[code].status, []).append(code)
    return {str(status): _error("; ".join(f"`{code}`: {ERRORS[code].when}" for code in found))
            for status, found in sorted(by_status.items())}


_AUTH = ("missing_api_key", "invalid_api_key", "wrong_key_kind")
_ADMIN = (*_AUTH, "admin_disabled")
_BODY = ("invalid_json", "invalid_request", "request_too_large", "client_disconnected")
_RAG_ADMIN = (*_ADMIN, "rag_disabled", "rag_unavailable")
_RELAY_ERRORS = {
    **errors(*_AUTH, *_BODY, "model_not_found", "backend_busy", "backend_unreachable", "backend_error",
             "backend_not_running", "no_healthy_backend", "backend_timeout"),
    "default": _error("A backend's own error (e.g. vLLM's 400 for a prompt over its context), in OpenAI's shape "
                      "with the backend's status and message"),
}


def _relay(summary: str, schema: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {
            "200": {"description": "The backend's answer: JSON, or an event stream when `stream` is true "
                                   "(each event's data is a JSON chunk, the last one `[DONE]`)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                                 "properties": {"data": {"type": "string"},
                                                                                "event": {"type": "string"}}}}}},
            **_RELAY_ERRORS,
        },
    }}


def _json_get(summary: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}, **(extra or {})}}}


def _post(summary: str, schema: str, errors: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                      **errors}}}


def openapi_document(models: list[str], embedding_model: str) -> dict[str, Any]:
    (_, _, _, _, _, _), components = msgspec.json.schema_components(
        [ChatRequest, CompletionRequest, EmbeddingRequest, IngestRequest, SearchRequest, ErrorResponse],
        ref_template="#/components/schemas/{name}"
    )
    for name in ("ChatRequest", "CompletionRequest"):
        components[name]["properties"]["model"]["enum"] = models
    components["EmbeddingRequest"]["properties"]["model"]["enum"] = [embedding_model]
    admin_errors = errors(*_ADMIN)
    rag_admin_errors = errors(*_RAG_ADMIN, *_BODY)
    return {
        "openapi": "3.1.0",
        "info": {"title": "DreamSeed proxy", "version": __version__,
                 "description": "OpenAI-compatible edge proxy; routing follows policies/routing.yaml."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        # Keys are optional (a proxy without configured client keys is open on loopback).
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/chat/completions": _relay("Create a chat completion", "ChatRequest"),
            "/v1/completions": _relay("Create a text completion", "CompletionRequest"),
            "/v1/models": _json_get("List the models: auto, the rules' aliases, each backend and the model it serves",
                                    errors(*_AUTH)),
            "/v1/models/{model}": {"get": {
                "summary": "Retrieve one of the models /v1/models lists (model ids may contain slashes)",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **errors(*_AUTH, "model_not_found")}}},
            "/v1/embeddings": _post("Create embeddings (OpenAI-compatible), from rag.yaml's embedder", "EmbeddingRequest",
                                    errors(*_AUTH, *_BODY, "invalid_dimensions", "model_not_found", "embeddings_busy",
                                           "embeddings_unavailable")),
            "/admin/rag": _json_get("RAG status and collections (admin key)", admin_errors),
            "/admin/rag/ingest": _post("Add documents to a collection (admin key)", "IngestRequest", rag_admin_errors),
            "/admin/rag/search": _post("What retrieval finds for a query (admin key)", "SearchRequest", rag_admin_errors),
            "/admin/rag/documents": {"delete": {
                "summary": "Delete a collection, a source, or a source within a collection (admin key)",
                "parameters": [{"name": "collection", "in": "query", "required": False, "schema": {"type": "string"}},
                               {"name": "source", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "How many chunks were deleted",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **errors(*_RAG_ADMIN, "invalid_request")}}},
            "/healthz": _json_get("Liveness"),
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)", "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": _json_get("This document"),
            "/readyz": _json_get("Readiness: a backend of the catch-all rule is up",
                                 {"503": {"description": "Not ready",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}}),
            "/admin/backends": _json_get("Backend states (admin key)", admin_errors),
            "/admin/backends/{name}/{action}": {"post": {
                "summary": "Start or stop an on-demand backend (admin key)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                               {"name": "action", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": ["start", "stop"]}}],
                "responses": {"202": {"description": "Accepted: the backend's new scaler state",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **errors(*_ADMIN, "backend_not_found", "not_found", "not_on_demand")}}},
            "/admin/policies": _json_get("The policy in force and the last reload (admin key)", admin_errors),
            "/admin/policies/reload": {"post": {"summary": "Validate the policy files and swap them in (admin key)",
                                                "responses": {
                "200": {"description": "Reloaded or unchanged",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "422": {"description": "The files are invalid; the running policy stays",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                **admin_errors}}},
        },
    }
