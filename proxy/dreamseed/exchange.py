"""The record of one request (:class:`Exchange`), filled in along the request path and read by the
metrics, the access log and the scaler; and the token counts a backend's answer reports."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

NONE = "none"  # label value when a request ended before a rule or backend was chosen


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None


def usage_of(body: bytes) -> tuple[int, int] | None:
    """Token counts from an OpenAI response (or a stream chunk) that carries `usage`."""
    try:
        usage = msgspec.json.decode(body, type=_WithUsage).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return (usage.prompt_tokens, usage.completion_tokens) if usage is not None else None


class Exchange(msgspec.Struct):
    """What happened to one request, filled in as it goes; `finish` hands it to the metrics and
    the access log once the answer's last byte is sent. A msgspec Struct: one is made for every
    request (docs/decisions/structs-on-the-request-path.md)."""

    request_id: str
    endpoint: str
    started: float = msgspec.field(default_factory=time.perf_counter)
    stream: bool = False
    rule: str = NONE
    backend: str = NONE
    fallbacks: list[str] = msgspec.field(default_factory=list)
    status: int = 0
    error: str | None = None  # an error code: the proxy's, or a mid-stream failure
    first_byte: float | None = None
    upstream_started: float | None = None
    upstream_done: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt: str | None = None  # only with --log-prompts
    rag: str | None = None  # retrieval outcome: hits, empty, degraded (None: retrieval off)
    rag_hits: int | None = None
    rag_seconds: float | None = None
    on_finish: Callable[[Exchange], None] | None = None

    def finish(self) -> None:
        if self.on_finish is not None:
            callback, self.on_finish = self.on_finish, None
            callback(self)
