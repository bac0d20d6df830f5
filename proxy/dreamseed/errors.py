"""OpenAI-style errors: every failure a client sees is ``{"error": {"message", "type", "code"}}``.

OpenAI SDKs read that shape to raise typed exceptions (``NotFoundError``, ``RateLimitError``...),
so the proxy never answers with a bare string or a framework's own error page.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger("dreamseed.errors")


class ProxyError(Exception):
    """An error to send to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> bytes:
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
    return ProxyError(400, message, type="invalid_request_error", code=code, param=param)


# Litestar raises its own HTTPExceptions (no such route, wrong method, body too large);
# translate them so clients get the same shape as for the proxy's own errors.
_HTTP_CODES = {
    404: ("not_found", "invalid_request_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    413: ("request_too_large", "invalid_request_error"),
    415: ("unsupported_media_type", "invalid_request_error"),
}


def handle_proxy_error(_: Request[Any, Any, Any], exc: ProxyError) -> Response[bytes]:
    return error_response(exc)


def from_http_exception(exc: HTTPException) -> ProxyError:
    code, kind = _HTTP_CODES.get(exc.status_code, ("http_error", "invalid_request_error"))
    if exc.status_code >= 500:
        code, kind = "internal_error", "server_error"
    return ProxyError(exc.status_code, str(exc.detail), type=kind, code=code, headers=dict(exc.headers or {}))


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    return error_response(from_http_exception(exc))


def handle_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    return Response(
        error_body("internal error in the proxy", type="server_error", code="internal_error"),
        status_code=500,
        media_type="application/json",
    )
