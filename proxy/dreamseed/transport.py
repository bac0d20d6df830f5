"""A lean HTTP/1.1 transport for ``httpx.AsyncClient``, for the proxy's backend connections.

httpx's default pool (httpcore) rescans every connection for every request it queues, which is
quadratic in concurrency (docs/decisions/own-connection-pool.md). This transport keeps httpx's
client API, timeouts and exception types, and replaces what is underneath with the minimum a
reverse proxy needs:

- one asyncio Protocol per connection, parsed with httptools (the parser uvicorn uses);
- a LIFO list of idle keep-alive connections (O(1) to take and return) and a FIFO of waiters
  for a free slot, bounded by ``max_connections`` with the pool timeout;
- response bodies streamed chunk by chunk as they arrive, with the read timeout per chunk.

The proxy's hot path goes further and calls :meth:`PooledTransport.send` with request bytes
it prepared itself (the head's constant part is built once per backend), skipping httpx's
request building, cookie jar and redirect machinery, about a third of the proxy's CPU per
request. Everything else (readiness probes) uses the ``httpx.AsyncClient`` over the same pool.

It speaks HTTP/1.1 to one origin, plain or TLS, without redirects, proxies or HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools
import httpx

READ_BUFFER_LIMIT = 1024 * 1024  # pause reading a backend that gets this far ahead of its client


class _Connection(asyncio.Protocol):
    """One keep-alive connection; holds at most one response in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time the current wait times out at (see wait)
        self._timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # One parser for the connection's life: llhttp starts over after each complete response,
        # and a connection is reused only after one (see UpstreamResponse.aclose).
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: deque[bytes] = deque()  # empty whenever the connection is reused
        self._reset()

    def _reset(self) -> None:
        self._stop_timer()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.buffered = 0
        self.error: Exception | None = None
        self.received_any = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - we never ask to upgrade
            self.error = httpx.RemoteProtocolError("unexpected protocol upgrade")
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"malformed response from backend: {exc}")
        if self.error is not None and self.transport is not None:
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = (
                httpx.RemoteProtocolError("backend closed the connection without sending a complete response")
                if self.received_any
                else httpx.ReadError("backend closed the connection")
            )
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_BUFFER_LIMIT and self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # -- used by the transport -----------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next parser event (or the connection's end), at most `timeout` seconds.

        One future, not asyncio.wait_for: on Python 3.11 that adds a second future, a done
        callback and an extra event loop pass before the waiting task resumes, on every response
        this proxy relays. And one timer per connection that moves lazily, not a timer per wait:
        a stream waits once per token, and each wait only moves the deadline forward; the timer,
        when it fires early, sleeps again until the deadline (_check_deadline)."""
        waiter = self._waiter = self.loop.create_future()
        if timeout is None:
            self._stop_timer()  # an earlier wait's deadline (a first-byte timeout, say) is not this one's
        else:
            deadline = self._deadline = self.loop.time() + timeout
            if self._timer is None or self._timer.when() > deadline:  # a shorter timeout than the last
                self._stop_timer()
                self._timer = self.loop.call_at(deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits now; the next wait arms a timer again
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
        else:
            waiter.set_exception(httpx.ReadTimeout("backend sent nothing within the read timeout"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, data: bytes, timeout: float | None) -> None:
        assert self.transport is not None
        # A server that accepts and closes at once (a load balancer or Service with no backend
        # behind it) leaves a closed transport, whose write raises RuntimeError: nothing was sent,
        # so it is a failure to connect (retried, then the next server of the chain).
        if self.closed:
            raise httpx.ConnectError("the server closed the connection before the request was sent")
        try:
            self.transport.write(data)
        except RuntimeError as exc:
            raise httpx.ConnectError(f"the server closed the connection before the request was sent ({exc})") from None
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(self._drain_waiter, timeout)
            except TimeoutError:
                raise httpx.WriteTimeout("backend did not accept the request within the write timeout") from None
            finally:
                self._drain_waiter = None

    def take_chunk(self) -> bytes:
        chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None
    read: float | None
    write: float | None
    pool: float | None
    first_byte: float | None = None  # until the response head is in; None: the read timeout


class FirstByteTimeout(httpx.ReadTimeout):
    """The backend accepted the request but had not started answering within `first_byte`."""


class UpstreamResponse:
    """A backend's response: status and headers now, the body as it arrives."""

    __slots__ = ("status", "headers", "_transport", "_connection", "_read_timeout", "_released")

    def __init__(self, transport: PooledTransport, connection: _Connection, read_timeout: float | None) -> None:
        self.status = connection.status
        self.headers = connection.headers
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout
        self._released = False

    def header(self, name: bytes) -> bytes | None:
        """A header's value (name in lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def next_chunk(self) -> bytes | None:
        """The body's next bytes as they arrive (de-chunked, never decoded); None at its end."""
        connection = self._connection
        while not connection.chunks:
            if connection.complete:
                return None
            if connection.error is not None:
                raise connection.error
            await connection.wait(self._read_timeout)
        return connection.take_chunk()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def aread(self) -> bytes:
        """The whole body. A loop over next_chunk, not aiter_raw: an async generator per response
        costs its frame and the event loop's registration of it (a WeakSet add and remove)."""
        chunks: list[bytes] = []
        while (chunk := await self.next_chunk()) is not None:
            chunks.append(chunk)
        return b"".join(chunks)  # one chunk (the usual case) comes back as is, not copied

    async def aclose(self) -> None:
        """close(), for httpx's interface (_HttpxBody)."""
        self.close()

    def close(self) -> None:
        """Give the connection back: to the idle list if the response was read to its end,
        else closed (which is how a backend learns that its client went away). Nothing in it
        waits, so the relay calls it directly: an `await aclose()` costs a coroutine per response,
        and a server's connection-lost callback cannot await."""
        if not self._released:
            self._released = True
            connection = self._connection
            reusable = connection.complete and connection.keep_alive and not connection.closed and not connection.chunks
            self._transport._release(connection if reusable else None, close=None if reusable else connection)


class _HttpxBody(httpx.AsyncByteStream):
    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


class QueueFull(httpx.PoolTimeout):
    """Every connection is busy and the wait queue is at its bound: refused without waiting."""


class SlotCounter(Protocol):
    """A backend's request slots: at most `limit` requests in flight, at most `max_queue` waiting for
    one (None: no bound). :class:`LocalSlots` counts for one process; with `serve --workers N` the
    workers count in one shared table (slots.SharedSlots), so the limits hold for the backend."""

    limit: int
    max_queue: int | None

    async def acquire(self, timeout: float | None) -> None:
        """Take a slot, waiting up to `timeout` seconds in arrival order: QueueFull when the queue is
        at its bound, httpx.PoolTimeout when no slot freed up in time."""

    def release(self) -> None:
        """Give a slot back: to the first waiter, or free."""

    def occupancy(self) -> int:
        """Slots taken plus requests waiting for one, by everyone who counts here (every worker)."""

    def try_acquire(self) -> bool:
        """Take a slot only if one is free and nobody waits for one; never waits."""


class LocalSlots:
    """One process's count of a backend's slots, with a FIFO of waiters."""

    __slots__ = ("limit", "max_queue", "_taken", "_waiting", "_waiters")

    def __init__(self, limit: int, max_queue: int | None = None) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self._taken = 0
        self._waiting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def occupancy(self) -> int:
        return self._taken + self._waiting

    def try_acquire(self) -> bool:
        if self._taken < self.limit and not self._waiting:
            self._taken += 1
            return True
        return False

    async def acquire(self, timeout: float | None) -> None:
        if self._taken < self.limit and not self._waiting:
            self._taken += 1
            return
        if self.max_queue is not None and self._waiting >= self.max_queue:
            raise QueueFull(f"all {self.limit} connections are busy and {self._waiting} requests already wait")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise httpx.PoolTimeout(f"all {self.limit} connections stayed busy for the pool timeout") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot reached us just as we gave up: pass it on
            raise
        finally:
            self._waiting -= 1
        # A released slot was handed over with the wake-up: `_taken` already counts it.

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._taken -= 1


class PooledTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections to one origin (see the module docstring). `slots` counts the
    requests in flight and waiting; by default this pool counts alone (max_connections, max_queue)."""

    def __init__(self, origin: str, *, max_connections: int, keepalive_expiry: float,
                 max_queue: int | None = None, ssl_context: ssl.SSLContext | None = None,
                 slots: SlotCounter | None = None) -> None:
        parts = urlsplit(origin)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        self.authority = self.host if default_port else f"{self.host}:{self.port}"
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context  # made on the first connection if TLS
        self._idle: list[_Connection] = []  # LIFO: the most recently used is the most likely alive
        self._slots = slots if slots is not None else LocalSlots(max_connections, max_queue)
        # This pool's own requests, whoever counts the slots: a reload's old pool drains by its own.
        self._in_use = 0
        self._waiting = 0
        self._closed = False

    @property
    def in_use(self) -> int:
        """This pool's requests holding a connection now (in flight to the backend)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """This pool's requests queued for a slot now."""
        return self._waiting

    def occupancy(self) -> int:
        """The backend's slots taken and waited for by every worker (balancing reads this)."""
        return self._slots.occupancy()

    def reserve(self) -> bool:
        """Take a slot now if one is free (for the next `send(..., reserved=True)`); never waits.
        Balancing across replicas asks each in turn, so a request waits only when all are full."""
        if self._closed or not self._slots.try_acquire():
            return False
        self._in_use += 1
        return True

    async def send(self, data: bytes, timeouts: Timeouts, *, reserved: bool = False) -> UpstreamResponse:
        """Send one complete request (head and body) and return once the response head is in;
        `reserved`: the slot was taken by `reserve()`.

        Raises httpx's exceptions: PoolTimeout, ConnectError, ConnectTimeout, WriteTimeout,
        ReadTimeout, ReadError, RemoteProtocolError."""
        if not reserved:
            await self._acquire_slot(timeouts.pool)
        connection: _Connection | None = None
        try:
            # The head arrives within `first_byte` in all, or else with no gap over `read`.
            deadline = None if timeouts.first_byte is None else time.monotonic() + timeouts.first_byte
            connection, reused = await self._connect(timeouts.connect)
            try:
                await self._exchange_head(connection, data, timeouts, deadline)
            except (httpx.ConnectError, httpx.ReadError):
                # A server may close a kept-alive connection just as we reuse it (llama-server closes
                # it after a streamed answer; the close can arrive after our request went out). It
                # read nothing of ours then, so the request goes once more on a new connection, as
                # browsers and Go's net/http do; an error on a new connection is the server's answer.
                if not reused or connection.received_any:
                    raise
                connection.close()
                connection, _ = await self._connect(timeouts.connect, fresh=True)
                await self._exchange_head(connection, data, timeouts, deadline)
        except BaseException:
            # Slot and connection are given back however the request failed (cancellation included).
            self._release(None, close=connection)
            raise
        return UpstreamResponse(self, connection, timeouts.read)

    @staticmethod
    async def _exchange_head(connection: _Connection, data: bytes, timeouts: Timeouts, deadline: float | None) -> None:
        """Write the request and wait for the response head."""
        await connection.write(data, timeouts.write)
        while not connection.headers_done:
            if connection.error is not None:
                raise connection.error
            if deadline is None:
                await connection.wait(timeouts.read)
                continue
            try:
                await connection.wait(max(deadline - time.monotonic(), 0.0))
            except httpx.ReadTimeout:
                raise FirstByteTimeout(f"no response within {timeouts.first_byte:g} s") from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's transport interface, over the same pool."""
        t = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        response = await self.send(_request_head(request) + body,
                                   Timeouts(t.get("connect"), t.get("read"), t.get("write"), t.get("pool")))
        return httpx.Response(status_code=response.status, headers=response.headers, stream=_HttpxBody(response),
                              extensions={"http_version": b"HTTP/1.1"})

    async def _acquire_slot(self, timeout: float | None) -> None:
        if self._closed:
            raise httpx.PoolTimeout("transport is closed")
        self._waiting += 1
        try:
            await self._slots.acquire(timeout)
        finally:
            self._waiting -= 1
        self._in_use += 1

    def _release(self, idle: _Connection | None, close: _Connection | None = None) -> None:
        if close is not None:
            close.close()
        if idle is not None:
            idle.idle_since = time.monotonic()
            idle._reset()
            self._idle.append(idle)
        self._in_use -= 1
        self._slots.release()

    async def _connect(self, timeout: float | None, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection and True (reused), else a new one and False; `fresh`: always a new one."""
        now = time.monotonic()
        while self._idle and not fresh:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_expiry:
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        if self.tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host=self.host, port=self.port,
                                       ssl=self._ssl_context if self.tls else None),
                timeout,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"could not connect to {self.authority} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"could not connect to {self.authority}: {exc.strerror or exc}") from None
        return connection, False

    async def aclose(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)
