"""OpenAI-style errors: every failure a client sees is ``{"error": {"message", "type", "code"}}``.

OpenAI SDKs read that shape to raise typed exceptions (``NotFoundError``, ``RateLimitError``...),
so the proxy never answers with a bare string or a framework's own error page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger("dreamseed.errors")


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int  # 0: sent as a final stream event after a 200 has begun
    type: str  # OpenAI's error type, which SDKs map to exception classes
    when: str  # for the documentation (docs/api.md's table, the OpenAPI document)


# Every error code the proxy itself answers with: the one place that says its status and type.
# ProxyError takes a code from here; the OpenAPI document and docs/api.md's table are built from it.
ERRORS: dict[str, ErrorKind] = {
    "invalid_json": ErrorKind(400, "invalid_request_error", "the body is not JSON, or not a JSON object"),
    "invalid_request": ErrorKind(400, "invalid_request_error",
                                 "a field is missing or of the wrong type (`param` names it), or text that cannot be stored"),
    "invalid_dimensions": ErrorKind(400, "invalid_request_error",
                                    "`/v1/embeddings` asked for `dimensions` the embedding model does not make"),
    "input_too_long": ErrorKind(400, "invalid_request_error",
                                "`/v1/embeddings`: an input over the model's `max_input_tokens`, or more than "
                                "`max_request_tokens` in all (rag.yaml embedder)"),
    "client_disconnected": ErrorKind(400, "invalid_request_error", "the client went away while sending the body"),
    "missing_api_key": ErrorKind(401, "invalid_request_error",
                                 "client keys are configured and the request has none (`WWW-Authenticate: Bearer`)"),
    "invalid_api_key": ErrorKind(401, "invalid_request_error", "an unknown key (`WWW-Authenticate: Bearer`)"),
    "wrong_key_kind": ErrorKind(403, "permission_error",
                                "a valid key of the other kind (client key on `/admin/*` or the reverse)"),
    "admin_disabled": ErrorKind(403, "permission_error", "an admin call while no admin key is configured"),
    "collection_not_allowed": ErrorKind(403, "permission_error",
                                        "`x-dreamseed-rag: collection=NAME` names a collection other than the rule's "
                                        "own or an `eval-` one"),
    "model_not_found": ErrorKind(404, "invalid_request_error",
                                 "unknown `model` (the message lists the available ones); "
                                 "on `/v1/embeddings`, not rag.yaml's embedder"),
    "backend_not_found": ErrorKind(404, "invalid_request_error", "`/admin/backends/{name}/...` names no catalog backend"),
    "not_found": ErrorKind(404, "invalid_request_error", "no such route or admin action"),
    "method_not_allowed": ErrorKind(405, "invalid_request_error", "the route exists, the method does not"),
    "rag_disabled": ErrorKind(409, "invalid_request_error", "an admin RAG call while no policy enables retrieval"),
    "not_on_demand": ErrorKind(409, "invalid_request_error",
                               "`/admin/backends/{name}/start` or `/stop` on a backend scale.yaml does not manage"),
    "request_too_large": ErrorKind(413, "invalid_request_error", "the body is over 10 MiB"),
    "unsupported_media_type": ErrorKind(415, "invalid_request_error", "a body of a media type the route does not take"),
    "embeddings_busy": ErrorKind(429, "rate_limit_error",
                                 "`/v1/embeddings` while `embedder.max_pending` requests are being embedded (`Retry-After: 1`)"),
    "backend_busy": ErrorKind(429, "rate_limit_error",
                              "the backend's `max_concurrency` slots and its `max_queue` are full, or no slot freed up "
                              "within its `pool` timeout (`Retry-After: 1`)"),
    "internal_error": ErrorKind(500, "server_error", "a fault in the proxy itself (logged with the request id)"),
    "backend_unreachable": ErrorKind(502, "server_error",
                                     "no backend in the chain could be connected to (the message lists what was tried)"),
    "backend_error": ErrorKind(502, "server_error", "the backend broke the connection before answering"),
    "embeddings_unavailable": ErrorKind(503, "server_error", "the embedder is not up (yet), or retrieval is off"),
    "rag_unavailable": ErrorKind(503, "server_error", "the RAG store is not up (yet); the message says why"),
    "backend_not_running": ErrorKind(503, "server_error",
                                     "the on-demand target is not running and the rule has no fallback (the message says why)"),
    "no_healthy_backend": ErrorKind(503, "server_error",
                                    "every backend of the rule's chain has an open circuit "
                                    "(`Retry-After`: until the next probe)"),
    "backend_timeout": ErrorKind(504, "server_error", "the backend accepted the request but sent nothing for its `read` timeout"),
    "upstream_disconnected": ErrorKind(0, "server_error", "mid-stream: the backend's connection was lost"),
    "upstream_timeout": ErrorKind(0, "server_error", "mid-stream: the backend sent nothing for its `read` timeout"),
}


class ProxyError(Exception):
    """An error to send to the client as-is; its status and type come from ERRORS[code]."""

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        kind = ERRORS[code]
        self.code = code
        self.status = status or kind.status  # `status`: only for statuses Litestar chose (from_http_exception)
        self.type = kind.type
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_table() -> str:
    """The Markdown table of ERRORS, for docs/api.md."""
    rows = ["| status | code | type | when |", "|---|---|---|---|"]
    for code, kind in sorted(ERRORS.items(), key=lambda item: (item[1].status or 999, item[0])):
        status = str(kind.status) if kind.status else "(stream event)"
        rows.append(f"| {status} | `{code}` | `{kind.type}` | {kind.when} |")
    return "\n".join(rows) + "\n"


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": type, "param": param, "code": code}})


def error_response(error: ProxyError, extra_headers: dict[str, str] | None = None) -> Response[bytes]:
    headers = {**error.headers, **(extra_headers or {})}
    return Response(
        error_body(error.message, type=error.type, code=error.code, param=error.param),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> ProxyError:
    return ProxyError(code, message, param=param)


# Litestar raises its own HTTPExceptions (no such route, wrong method, body too large);
# translate them so clients get the same shape as for the proxy's own errors.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def handle_proxy_error(_: Request[Any, Any, Any], exc: ProxyError) -> Response[bytes]:
    return error_response(exc)


def from_http_exception(exc: HTTPException) -> ProxyError:
    code = "internal_error" if exc.status_code >= 500 else _HTTP_CODES.get(exc.status_code, "invalid_request")
    return ProxyError(code, str(exc.detail), headers=dict(exc.headers or {}), status=exc.status_code)


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    return error_response(from_http_exception(exc))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # The relay endpoints answer their own faults (counted in the metrics and the access log);
    # this is every other route's last resort.
    supplied = dict(request.scope["headers"]).get(b"x-request-id", b"-").decode("latin-1")[:128]
    log.error("unhandled error on %s %s (x-request-id %s)", request.method, request.url.path, supplied, exc_info=exc)
    return Response(
        error_body("internal error in the proxy", type=ERRORS["internal_error"].type, code="internal_error"),
        status_code=500,
        media_type="application/json",
    )
