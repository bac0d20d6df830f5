"""Send a routed request to its backend and relay the answer, streaming or not.

The relay is pass-through: the backend's bytes reach the client as they arrive, never
re-encoded. Backends in the decision's chain are tried in order while they cannot be
reached at all (not configured, connection refused); once a backend has accepted the
request, its answer (or its error) is the answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from .backends import Upstreams
from .transport import UpstreamResponse
from .errors import ProxyError, error_body
from .routing import Decision

log = logging.getLogger("dreamseed.forwarding")

# Client headers worth passing on; everything else (notably the client's Authorization,
# which is for the proxy) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"user-agent", b"traceparent", b"tracestate"})

SSE_DONE = b"data: [DONE]\n\n"


def sse_error(message: str, code: str) -> bytes:
    """A final stream event in the shape vLLM uses for errors after streaming began; OpenAI
    SDKs raise it as an APIError. It is followed by [DONE] so every parser ends cleanly."""
    return b"data: " + error_body(message, type="server_error", code=code) + b"\n\n" + SSE_DONE


class RelayedStream(ASGIStreamingResponse):
    """A streaming response that always closes its upstream response, even when the
    client goes away mid-stream: closing it aborts the backend's generation."""

    def __init__(self, upstream: UpstreamResponse, backend: str, **kwargs: Any) -> None:
        super().__init__(iterator=relay_sse(upstream, backend), **kwargs)
        self._upstream = upstream

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            await self._upstream.aclose()


async def relay_sse(upstream: UpstreamResponse, backend: str) -> AsyncIterator[bytes]:
    """Yield the backend's SSE bytes as they arrive, up to the last complete line.

    Holding back only a trailing partial line (normally there is none) means that if the
    backend dies mid-stream, the error event we append starts on a clean line.
    """
    pending = b""
    try:
        async for chunk in upstream.aiter_raw():
            data = pending + chunk if pending else chunk
            cut = data.rfind(b"\n") + 1
            if cut == len(data):
                pending = b""
                yield data
            elif cut:
                pending = data[cut:]
                yield data[:cut]
            else:
                pending = data
        if pending:
            yield pending
    except httpx.TimeoutException:
        log.warning("backend %s stopped sending mid-stream (read timeout)", backend)
        yield b"\n" + sse_error("the backend stopped responding mid-stream", "upstream_timeout")
    except httpx.HTTPError as exc:
        log.warning("backend %s stream broke: %r", backend, exc)
        yield b"\n" + sse_error("the backend connection was lost mid-stream", "upstream_disconnected")


async def forward(
    upstreams: Upstreams,
    decision: Decision,
    path: str,
    payload: dict[str, Any],
    stream: bool,
    headers: dict[str, str],
    passed_on: list[tuple[bytes, bytes]],
) -> ASGIResponse:
    """Try the decision's chain in order and return the first backend's response.

    ``headers`` are the x-dreamseed-* and x-request-id headers for the client; the request
    id is forwarded to the backend too, with the client headers in ``passed_on``.
    """
    skipped: list[str] = []
    last_timeout = False
    outbound = [*passed_on, (b"x-request-id", headers["x-request-id"].encode("latin-1"))]
    for name in decision.chain:
        upstream = upstreams[name]
        if upstream.transport is None or upstream.timeouts is None:
            skipped.append(f"{name}:unavailable")
            continue
        payload["model"] = upstream.backend.model
        data = upstream.request_bytes(path, msgspec.json.encode(payload), outbound)
        try:
            response = await upstream.transport.send(data, upstream.timeouts)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("backend %s unreachable: %s", name, exc)
            skipped.append(f"{name}:unreachable")
            last_timeout = isinstance(exc, httpx.ConnectTimeout)
            continue
        except httpx.PoolTimeout:
            raise ProxyError(
                429,
                f"backend {name!r} is at its limit of {upstream.backend.max_concurrency} concurrent requests",
                type="rate_limit_error",
                code="backend_busy",
                headers={**headers, "x-dreamseed-backend": name, "retry-after": "1"},
            ) from None
        except httpx.TimeoutException:
            raise ProxyError(
                504, f"backend {name!r} did not answer in time", type="server_error", code="backend_timeout",
                headers={**headers, "x-dreamseed-backend": name},
            ) from None
        except httpx.HTTPError as exc:
            raise ProxyError(
                502, f"backend {name!r} failed: {type(exc).__name__}", type="server_error", code="backend_error",
                headers={**headers, "x-dreamseed-backend": name},
            ) from None

        headers["x-dreamseed-backend"] = name
        if skipped:
            headers["x-dreamseed-fallback"] = ", ".join(skipped)
        media_type = (response.header(b"content-type") or b"application/json").decode("latin-1")
        if stream and response.status == 200 and media_type.startswith("text/event-stream"):
            return RelayedStream(response, name, headers=headers, media_type=media_type, status_code=200)
        return await _buffered(name, response, headers, media_type)

    raise ProxyError(
        504 if last_timeout else 502,
        f"no backend for rule {decision.rule!r} could be reached (tried: {', '.join(skipped)})",
        type="server_error",
        code="backend_timeout" if last_timeout else "backend_unreachable",
        headers={**headers, "x-dreamseed-fallback": ", ".join(skipped)},
    )


async def _buffered(name: str, response: UpstreamResponse, headers: dict[str, str], media_type: str) -> ASGIResponse:
    try:
        body = await response.aread()
    except httpx.TimeoutException:
        raise ProxyError(
            504, f"backend {name!r} did not finish its answer in time", type="server_error", code="backend_timeout",
            headers=headers,
        ) from None
    except httpx.HTTPError as exc:
        raise ProxyError(
            502, f"backend {name!r} broke off its answer: {type(exc).__name__}", type="server_error",
            code="backend_error", headers=headers,
        ) from None
    finally:
        await response.aclose()
    return ASGIResponse(body=body, status_code=response.status, media_type=media_type, headers=headers)
