"""The HTTP server the proxy runs on: uvicorn with its httptools protocol, plus the limits a
public endpoint needs and uvicorn's httptools protocol does not have.

Without them a client could hold memory and connections at will (huge headers accepted,
unfinished headers held, slowloris and silent connections kept open, a body shorter than its
Content-Length waited for; tests/faults/test_http_limits.py). Here:

* the request head (request line and headers) is capped: more bytes than `max_header_bytes`
  before the head ends gets 431;
* the head must arrive within `header_timeout` of the connection opening or of the request's
  first byte (slowloris, silent connections): 408, connection closed;
* the body must arrive within `body_timeout` of the head: 408, connection closed;
* at most `max_connections` connections are open: the next ones get 503 and are closed.

The answers are short plain text that says what limit was hit, nothing about the internals.
The checks cost a counter and a timer per request, not per byte parsed.

It also offers the app the CLIENT_GONE scope extension (request_path/responses.py): a callback run when the
client's connection is lost, so a relayed stream stops its backend without a task of its own
waiting on `receive` for the disconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .request_path.responses import CLIENT_GONE


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1024


def _response(status: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


TOO_LARGE = _response("431 Request Header Fields Too Large", "request header fields too large\n")
HEAD_TIMEOUT = _response("408 Request Timeout", "request headers not received in time\n")
BODY_TIMEOUT = _response("408 Request Timeout", "request body not received in time\n")
TOO_MANY = _response("503 Service Unavailable", "too many open connections\n")


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (set by `protocol_with`)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._in_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._on_client_gone: Callable[[], None] | None = None
        # One extensions dict per connection, put in each request's scope (not one per request).
        self._extensions: dict[str, dict[object, object]] = {CLIENT_GONE: {"register": self._when_client_gone}}

    def _when_client_gone(self, callback: Callable[[], None] | None) -> None:
        self._on_client_gone = callback

    # -- timers ----------------------------------------------------------------------------
    def _arm(self, seconds: float, answer: bytes) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire, answer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, answer: bytes) -> None:
        self._timer = None
        self._refuse(answer)

    def _refuse(self, answer: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        # While a head is coming in, uvicorn's `cycle` is still the previous request's (kept-alive
        # connection), whose answer went out long ago: the refusal is for this request.
        if self._in_head or self.cycle is None or not self.cycle.response_started:
            self.transport.write(answer)
        if self.cycle is not None and not self._in_head:
            self.cycle.disconnected = True  # the app, if it is reading the body, sees the client gone
            self.cycle.message_event.set()
        self.transport.close()

    # -- the protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(TOO_MANY)
            return
        self._arm(self.limits.header_timeout, HEAD_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        callback, self._on_client_gone = self._on_client_gone, None
        if callback is not None:
            callback()

    # The four callbacks below run for every request (httptools calls them as it parses). They
    # call HttpToolsProtocol's own directly, not through super(), which makes a proxy object per
    # call, and test the timer before calling _disarm.
    def data_received(self, data: bytes) -> None:
        if not self._in_body:  # a head's bytes (reset when a head is complete)
            self._head_bytes += len(data)
        HttpToolsProtocol.data_received(self, data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(TOO_LARGE)
        # Timers are armed only for a request still unfinished when its bytes so far are parsed:
        # most requests arrive whole in one read and never need one (a timer armed and cancelled
        # for the head and again for the body cost a few microseconds a request).
        elif self._timer is None and self._in_body:
            self._arm(self.limits.body_timeout, BODY_TIMEOUT)
        elif self._timer is None and self._in_head:
            self._arm(self.limits.header_timeout, HEAD_TIMEOUT)

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self.scope["extensions"] = self._extensions
        self._in_head = True  # (again, for the next request on a kept-alive connection)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._timer is not None:
            self._disarm()
        HttpToolsProtocol.on_headers_complete(self)
        # In the body until on_message_complete: for a request without one, or whose body came in
        # the same read, the parser calls it before this read's data_received returns.
        self._in_body = True

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._timer is not None:
            self._disarm()
        HttpToolsProtocol.on_message_complete(self)


def protocol_with(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for uvicorn's `http=` setting, bound to these limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
