"""What the Litestar handlers share: the running service, the request's key, a JSON answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.response.base import ASGIResponse

from ..service import Service

AnyRequest = Request[Any, Any, Any]


def service_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Service:
    service: Service = connection.app.state.service
    return service


def authorization(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes | None:
    for name, value in connection.scope["headers"]:
        if name == b"authorization":
            return value
    return None


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> ASGIResponse:
    return ASGIResponse(
        body=msgspec.json.encode(data), status_code=status, media_type="application/json", headers=dict(headers or {})
    )
