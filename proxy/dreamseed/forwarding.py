"""Send a routed request to its backend and relay the answer, streaming or not.

The relay is pass-through: the backend's bytes reach the client as they arrive, never
re-encoded. Backends in the decision's chain are tried in order while they cannot be
reached at all (not configured, connection refused); once a backend has accepted the
request, its answer (or its error) is the answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import msgspec
from litestar.types import Receive, Scope, Send

from .backends import Upstreams
from .errors import ERRORS, ProxyError, error_body
from .metrics import Exchange, usage_of
from .routing import Decision
from .transport import FirstByteTimeout, QueueFull, UpstreamResponse

log = logging.getLogger("dreamseed.forwarding")

# Client headers worth passing on; everything else (notably the client's Authorization,
# which is for the proxy) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"user-agent", b"traceparent", b"tracestate"})

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
    words and numbers), so the default codec serves: `encode("latin-1")` looks the codec's name up
    on every call (600 machine instructions against 360; about 2,000 a request)."""
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
    run when the connection is lost. Elsewhere a watcher task waits for the client's
    http.disconnect on `receive`; that task, its first step and its cancellation at the stream's
    end cost about 40,000 machine instructions a stream (801-804k -> 761-766k for a stream of 20
    events, callgrind), a quarter of what the proxy's features add to a request. (Litestar's own stream
    response runs a task group per request; either is cheaper on the path every streamed token
    takes.)"""

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
            # One plain loop per event: an async generator between the upstream and this loop cost
            # about 1,500 instructions an event (its asend object and frame switches), 5% of what
            # relaying an event costs (845k -> 811k instructions for a stream of 20 events,
            # benchmarks/test_relay_instructions.py).
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


def _backoff(attempt: int) -> float:
    """Full jitter: a random wait up to 50 ms, 100 ms, 200 ms... (at most 1 s)."""
    return random.uniform(0, min(1.0, 0.05 * 2**attempt))


RETRYABLE_STATUS = frozenset({502, 503})


async def forward(
    upstreams: Upstreams,
    decision: Decision,
    path: str,
    payload: dict[str, Any],
    stream: bool,
    headers: dict[str, str],
    passed_on: list[tuple[bytes, bytes]],
    exchange: Exchange,
) -> BufferedResponse | RelayedStream:
    """Try the decision's chain in order and return the first backend's response.

    A backend is skipped when it is not configured or its circuit is open; it is retried
    (with jitter, up to its `retries`) and then skipped when it cannot be reached or answers
    502/503. Nothing is retried once the backend has accepted the request otherwise, and
    nothing after the first byte reached the client.

    ``headers`` are the x-dreamseed-* and x-request-id headers for the client; the request
    id is forwarded to the backend too, with the client headers in ``passed_on``.
    """
    skipped = exchange.fallbacks  # the access log and metrics see what was skipped, and why
    exchange.stream = stream
    last_timeout = False
    retry_after: float | None = None
    outbound = [*passed_on, (b"x-request-id", headers["x-request-id"].encode())]
    chain = decision.chain
    for position, name in enumerate(chain):
        upstream = upstreams[name]
        transport, timeouts, circuit = upstream.transport, upstream.timeouts, upstream.circuit
        if transport is None or timeouts is None or circuit is None:
            skipped.append(f"{name}:unavailable")
            continue
        if not circuit.allows_requests():
            skipped.append(f"{name}:circuit_open")
            retry_after = min(retry_after if retry_after is not None else 1e9, circuit.retry_after())
            continue
        payload["model"] = upstream.backend.model
        data = upstream.request_bytes(path, msgspec.json.encode(payload), outbound)
        has_fallback = position < len(chain) - 1
        attempts = 1 + upstream.backend.retries
        response = None
        exchange.backend = name
        exchange.upstream_started = time.perf_counter()
        for attempt in range(attempts):
            try:
                response = await transport.send(data, timeouts)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                circuit.record_failure(str(exc))
                last_timeout = isinstance(exc, httpx.ConnectTimeout)
                if attempt + 1 < attempts:
                    await asyncio.sleep(_backoff(attempt))
                    continue
                log.warning("backend %s unreachable: %s", name, exc)
                skipped.append(f"{name}:unreachable")
                break
            except httpx.PoolTimeout as exc:
                queued = "the wait queue is full" if isinstance(exc, QueueFull) else "no slot freed up in time"
                raise ProxyError(
                    "backend_busy",
                    f"backend {name!r} is at its limit of {upstream.backend.max_concurrency} concurrent requests "
                    f"and {queued}; retry shortly",
                    headers={**headers, "x-dreamseed-backend": name, "retry-after": "1"},
                ) from None
            except FirstByteTimeout as exc:
                circuit.record_failure(str(exc))
                last_timeout = True
                if has_fallback:  # a hung backend: move along the chain now
                    log.warning("backend %s did not start answering: %s", name, exc)
                    skipped.append(f"{name}:first_byte_timeout")
                    break
                raise ProxyError(
                    "backend_timeout",
                    f"backend {name!r} did not start answering within its first_byte timeout",
                    headers={**headers, "x-dreamseed-backend": name},
                ) from None
            except httpx.TimeoutException:
                circuit.record_failure("read timeout")
                raise ProxyError(
                    "backend_timeout",
                    f"backend {name!r} did not answer in time",
                    headers={**headers, "x-dreamseed-backend": name},
                ) from None
            except httpx.HTTPError as exc:
                circuit.record_failure(type(exc).__name__)
                raise ProxyError(
                    "backend_error",
                    f"backend {name!r} failed: {type(exc).__name__}",
                    headers={**headers, "x-dreamseed-backend": name},
                ) from None
            if response.status in RETRYABLE_STATUS:
                status = response.status
                circuit.record_failure(f"answered {status}")
                if attempt + 1 < attempts:
                    response.close()
                    response = None
                    await asyncio.sleep(_backoff(attempt))
                    continue
                if has_fallback:  # else the last backend's own answer goes to the client
                    response.close()
                    response = None
                    skipped.append(f"{name}:http_{status}")
                break
            if response.status >= 500:
                circuit.record_failure(f"answered {response.status}")
            else:
                circuit.record_success()
            break
        if response is None:
            continue

        headers["x-dreamseed-backend"] = name
        if skipped:
            headers["x-dreamseed-fallback"] = ", ".join(skipped)
        media_type = response.header(b"content-type") or b"application/json"
        out = [(b"content-type", media_type), *raw_headers(headers)]
        if stream and response.status == 200 and media_type.startswith(b"text/event-stream"):
            return RelayedStream(response, name, out, exchange)
        return await _buffered(name, response, headers, out, exchange)

    if retry_after is not None and all(s.endswith(":circuit_open") for s in skipped):
        raise ProxyError(
            "no_healthy_backend",
            f"no healthy backend for rule {decision.rule!r} (tried: {', '.join(skipped)})",
            headers={**headers, "x-dreamseed-fallback": ", ".join(skipped),
                     "retry-after": str(max(1, round(retry_after)))},
        )
    raise ProxyError(
        "backend_timeout" if last_timeout else "backend_unreachable",
        f"no backend for rule {decision.rule!r} could be reached (tried: {', '.join(skipped)})",
        headers={**headers, "x-dreamseed-fallback": ", ".join(skipped)},
    )


async def _buffered(name: str, response: UpstreamResponse, headers: dict[str, str],
                    out: list[tuple[bytes, bytes]], exchange: Exchange) -> BufferedResponse:
    try:
        body = await response.aread()
    except httpx.TimeoutException:
        raise ProxyError(
            "backend_timeout",
            f"backend {name!r} did not finish its answer in time",
            headers=headers,
        ) from None
    except httpx.HTTPError as exc:
        raise ProxyError(
            "backend_error",
            f"backend {name!r} broke off its answer: {type(exc).__name__}",
            headers=headers,
        ) from None
    finally:
        response.close()
        exchange.upstream_done = time.perf_counter()
    if response.status == 200:
        counts = usage_of(body)
        if counts is not None:
            exchange.prompt_tokens, exchange.completion_tokens = counts
    return BufferedResponse(response.status, out, body, exchange)
