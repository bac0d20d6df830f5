"""The answers the request path returns, as bare ASGI apps: a backend's complete answer
(:class:`BufferedResponse`) and its event stream relayed as it arrives (:class:`RelayedStream`).

Both pass the backend's bytes through untouched, never re-encoded, and finish the request's
Exchange (metrics, access log) when the last byte is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

import httpx
from litestar.types import Receive, Scope, Send

from ..errors import ERRORS, error_body
from ..exchange import Exchange, usage_of
from ..transport import UpstreamResponse

log = logging.getLogger("dreamseed.relay")

SSE_DONE = b"data: [DONE]\n\n"

# An ASGI scope extension a server may offer: {"register": f}, where f takes a callback to run,
# without arguments, when the client's connection is lost while the request is being answered
# (f(None) withdraws it). One callback per connection at a time: HTTP/1.1 answers one request
# after another.
CLIENT_GONE = "dreamseed.client_gone"
Register = Callable[[Callable[[], None] | None], None]


def client_gone_register(scope: Scope) -> Register | None:
    """The server's CLIENT_GONE register function, if it offers one."""
    extension = (scope.get("extensions") or {}).get(CLIENT_GONE)
    return cast("Register | None", extension.get("register")) if extension else None


def sse_error(message: str, code: str) -> bytes:
    """A final stream event in the shape vLLM uses for errors after streaming began; OpenAI
    SDKs raise it as an APIError. It is followed by [DONE] so every parser ends cleanly."""
    return b"data: " + error_body(message, type=ERRORS[code].type, code=code) + b"\n\n" + SSE_DONE


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The proxy's own headers as ASGI wants them. Their names and values are ASCII (request ids
    are checked for it, rule and backend names by the policy schema, the rest are the proxy's own
    words and numbers), so the default codec serves and no codec is named."""
    return [(name.encode(), value.encode()) for name, value in headers.items()]


class BufferedResponse:
    """A complete response as a bare ASGI app: the body is the backend's bytes, untouched.
    When the last byte is sent, the request's Exchange is finished (metrics, access log)."""

    __slots__ = ("status", "headers", "body", "exchange")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                 exchange: Exchange | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = self.exchange
        try:
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [*self.headers, (b"content-length", str(len(self.body)).encode())]})
            if exchange is not None:
                exchange.first_byte = time.perf_counter()
            await send({"type": "http.response.body", "body": self.body, "more_body": False})
        finally:
            if exchange is not None:
                exchange.status = self.status
                exchange.finish()


class RelayedStream:
    """A backend's event stream relayed to the client as a bare ASGI app.

    The backend's bytes go out as they arrive, up to the last complete line: holding back only a
    trailing partial line (normally there is none) means that if the backend dies mid-stream, the
    error event appended starts on a clean line. The chunk that carries `usage` (sent last when the
    client asked for stream_options.include_usage) is kept for the token counters.

    When the client goes away, the upstream response is closed: that aborts the backend's
    generation and wakes the relay loop, which stops. The server tells us through the
    CLIENT_GONE scope extension where it has one (`dreamseed serve`'s does, server.py): a callback
    run when the connection is lost, cheaper than a task per stream
    (docs/decisions/client-gone-callback.md). Elsewhere a watcher task waits for the client's
    http.disconnect on `receive`."""

    __slots__ = ("upstream", "backend", "headers", "client_gone", "exchange")

    def __init__(self, upstream: UpstreamResponse, backend: str, headers: list[tuple[bytes, bytes]],
                 exchange: Exchange | None = None) -> None:
        self.upstream = upstream
        self.backend = backend
        self.headers = headers
        self.client_gone = False
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        on_client_gone = client_gone_register(scope)
        watcher = None
        if on_client_gone is not None:
            on_client_gone(self._client_left)
        else:
            watcher = asyncio.ensure_future(self._watch(receive))
        exchange = self.exchange
        upstream = self.upstream
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            # One plain loop per event: an async generator between the upstream and this loop would
            # add its own frame switches to every event.
            pending = usage_chunk = b""
            done = False
            while not done:
                try:
                    chunk = await upstream.next_chunk()
                except httpx.TimeoutException:
                    log.warning("backend %s stopped sending mid-stream (read timeout)", self.backend)
                    data, done = self._failed(504, "upstream_timeout", "the backend stopped responding mid-stream")
                except httpx.HTTPError as exc:
                    if self.client_gone:
                        # We closed the upstream ourselves because the client left: the backend did nothing wrong.
                        log.debug("client went away mid-stream from backend %s; generation aborted", self.backend)
                        return
                    log.warning("backend %s stream broke: %r", self.backend, exc)
                    data, done = self._failed(502, "upstream_disconnected", "the backend connection was lost mid-stream")
                else:
                    if chunk is None:
                        data, done = pending, True
                    else:
                        if b'"usage"' in chunk:
                            usage_chunk = chunk
                        data = pending + chunk if pending else chunk
                        cut = data.rfind(b"\n") + 1
                        if cut < len(data):
                            data, pending = data[:cut], data[cut:]
                        else:
                            pending = b""
                if not data:
                    continue
                if self.client_gone:
                    return
                if exchange is not None and exchange.first_byte is None:
                    exchange.first_byte = time.perf_counter()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if exchange is not None and usage_chunk:
                _count_stream_usage(usage_chunk, exchange)
            if not self.client_gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if on_client_gone is not None:
                on_client_gone(None)  # done: a later close of the connection is not this stream's business
            if watcher is not None:
                watcher.cancel()
            upstream.close()
            if exchange is not None:
                exchange.upstream_done = time.perf_counter()
                if self.client_gone:
                    # Nginx's convention: the client closed the request before the answer ended.
                    exchange.status, exchange.error = 499, "client_disconnected"
                elif exchange.status == 0:
                    exchange.status = 200
                exchange.finish()

    def _failed(self, status: int, code: str, message: str) -> tuple[bytes, bool]:
        """The stream broke: the error event that ends it (after whatever complete lines went out)."""
        if self.exchange is not None:
            self.exchange.status, self.exchange.error = status, code
        return b"\n" + sse_error(message, code), True

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_left()

    def _client_left(self) -> None:
        self.client_gone = True
        self.upstream.close()


def _count_stream_usage(chunk: bytes, exchange: Exchange) -> None:
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            counts = usage_of(line[6:])
            if counts is not None:
                exchange.prompt_tokens, exchange.completion_tokens = counts
