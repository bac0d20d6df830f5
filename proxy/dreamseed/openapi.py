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
from .openai_api import ChatRequest, CompletionRequest, EmbeddingRequest, IngestRequest, SearchRequest


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str | int | None = None  # the proxy's codes are strings; vLLM's passed-through ones are numbers
    param: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


_RELAY_ERRORS = {
    "400": _error("Bad request: the body is not JSON, not an object, or a field is missing or of the wrong type"),
    "401": _error("Missing or invalid API key"),
    "403": _error("A valid key of the wrong kind"),
    "404": _error("Unknown model; the message lists the available ones"),
    "413": _error("Request body over 10 MiB"),
    "429": _error("The backend's concurrency limit and wait queue are full (Retry-After is set)"),
    "500": _error("The backend's own error, passed through"),
    "502": _error("No backend in the chain could be reached, or one broke the connection"),
    "503": _error("No backend in the chain is healthy (circuits open), or the backend's own 503"),
    "504": _error("The backend accepted the request but did not answer within its read timeout"),
}
_AUTH_ERRORS = {"401": _RELAY_ERRORS["401"], "403": _RELAY_ERRORS["403"]}


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
                      "400": _error("Bad request: not JSON, or a field is missing or of the wrong type"),
                      **errors}}}


_RAG_ADMIN_ERRORS = {
    "409": _error("Retrieval is off: no policy enables it"),
    "503": _error("The RAG store or embedder is not up (yet)"),
}


def openapi_document(models: list[str], embedding_model: str) -> dict[str, Any]:
    (_, _, _, _, _, _), components = msgspec.json.schema_components(
        [ChatRequest, CompletionRequest, EmbeddingRequest, IngestRequest, SearchRequest, ErrorResponse],
        ref_template="#/components/schemas/{name}"
    )
    for name in ("ChatRequest", "CompletionRequest"):
        components[name]["properties"]["model"]["enum"] = models
    components["EmbeddingRequest"]["properties"]["model"]["enum"] = [embedding_model]
    admin_errors = {**_AUTH_ERRORS}
    rag_admin_errors = {**_AUTH_ERRORS, **_RAG_ADMIN_ERRORS}
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
            "/v1/models": _json_get("List the models: auto and each backend", _AUTH_ERRORS),
            "/v1/embeddings": _post("Create embeddings (OpenAI-compatible), from rag.yaml's embedder",
                                    "EmbeddingRequest", {**_AUTH_ERRORS,
                                                         "404": _error("Not the configured embedding model"),
                                                         "413": _RELAY_ERRORS["413"],
                                                         "429": _error("embedder.max_pending requests are running"),
                                                         "503": _error("The embedder is not up, or retrieval is off")}),
            "/admin/rag": _json_get("RAG status and collections (admin key)", admin_errors),
            "/admin/rag/ingest": _post("Add documents to a collection (admin key)", "IngestRequest",
                                       {**rag_admin_errors, "413": _RELAY_ERRORS["413"]}),
            "/admin/rag/search": _post("What retrieval finds for a query (admin key)", "SearchRequest",
                                       {**rag_admin_errors, "413": _RELAY_ERRORS["413"]}),
            "/admin/rag/documents": {"delete": {
                "summary": "Delete a collection, a source, or a source within a collection (admin key)",
                "parameters": [{"name": "collection", "in": "query", "required": False, "schema": {"type": "string"}},
                               {"name": "source", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "How many chunks were deleted",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              "400": _error("Neither collection nor source given"), **rag_admin_errors}}},
            "/healthz": _json_get("Liveness"),
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
                              "404": _error("Unknown backend or action"),
                              "409": _error("Not an on-demand backend, or mid-transition"), **admin_errors}}},
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
