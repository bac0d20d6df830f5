"""A backend's own error answer, in OpenAI's error shape.

vLLM answers `{"object": "error", "message", "type": "BadRequestError", "param", "code": 400}` (newer
releases nest the same under `error`); llama.cpp's server `{"error": {"code": 400, "message", "type"}}`;
a proxy in front of either may answer plain text. OpenAI's specification wants
`{"error": {"message", "type", "param", "code"}}` with one of its types and a string or null code,
so a client that branches on `error.type` or `error.code` sees one API whichever backend answered.
The status and the backend's message are kept; the type follows the status, as OpenAI's do; a string
code or param the backend gave is kept, a number is not (the status already says it).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import error_body

MAX_MESSAGE = 2000  # characters of a backend's message kept (a plain-text body may be a whole page)


def openai_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def openai_error(status: int, body: bytes) -> bytes:
    """The body of a backend's error answer (status >= 400) in OpenAI's shape."""
    detail: dict[str, Any] = {}
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict):
        nested = decoded.get("error")
        detail = nested if isinstance(nested, dict) else decoded
        if isinstance(nested, str):  # {"error": "some message"}, as some servers answer
            detail = {"message": nested}
    message = _text(detail.get("message")) or _text(detail.get("detail"))
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = text if text and decoded is None else f"the backend answered HTTP {status}"
    return error_body(message[:MAX_MESSAGE], type=openai_type(status), code=_text(detail.get("code")),
                      param=_text(detail.get("param")))
