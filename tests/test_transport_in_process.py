"""The proxy's HTTP/1.1 transport against a scripted server on a real loopback socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from dreamseed.transport import PooledTransport, Timeouts
from support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
QUICK = Timeouts(connect=2, read=2, write=2, pool=2)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


class Server:
    """Counts connections; answers each request with `respond(request, writer)`."""

    def __init__(self, respond: Callable[..., Awaitable[None]]) -> None:
        self.respond = respond
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await read_request(reader)
                self.requests.append(request)
                await self.respond(request, writer, reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()


async def ok(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
    await writer.drain()


def request(path: str = "/v1/x", body: bytes = b"{}") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_keep_alive_connections_are_reused() -> None:
    async def main() -> None:
        server = Server(ok)
        async with server as url:
            transport = PooledTransport(url, max_connections=4, keepalive_expiry=10)
            for _ in range(5):
                response = await transport.send(request(), QUICK)
                assert response.status == 200 and await response.aread() == b"{}"
                await response.aclose()
            assert server.connections == 1 and len(server.requests) == 5
            await transport.aclose()

    run(main())


def test_one_kept_alive_connection_parses_answers_of_every_framing_one_after_another() -> None:
    """The connection's one parser starts over after each answer: lengths, chunks, statuses and
    headers never leak from one answer into the next."""
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-n: 1\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nx-n: 4\r\ncontent-length: 3\r\n\r\nend",
    ]

    async def scripted(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        writer.write(answers[len(server.requests) - 1])
        await writer.drain()

    async def main() -> None:
        async with server as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            seen = []
            for _ in answers:
                response = await transport.send(request(), QUICK)
                seen.append((response.status, response.header(b"x-n"), await response.aread()))
                await response.aclose()
            assert seen == [(200, b"1", b'{"a":1}'), (200, None, b"data: hello"), (400, None, b""),
                            (201, b"4", b"end")]
            assert server.connections == 1
            await transport.aclose()

    server = Server(scripted)
    run(main())


def test_idle_connections_expire() -> None:
    async def main() -> None:
        server = Server(ok)
        async with server as url:
            transport = PooledTransport(url, max_connections=4, keepalive_expiry=0.05)
            for _ in range(2):
                response = await transport.send(request(), QUICK)
                await response.aread()
                await response.aclose()
                await asyncio.sleep(0.1)
            assert server.connections == 2
            await transport.aclose()

    run(main())


def test_chunked_body_streams_chunk_by_chunk() -> None:
    release = asyncio.Event()

    async def chunked(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(chunked) as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            response = await transport.send(request(), QUICK)
            assert response.header(b"content-type") == b"text/event-stream"
            chunks = response.aiter_raw()
            assert await chunks.__anext__() == b"data: 1"  # before the server sent the rest
            release.set()
            assert [c async for c in chunks] == [b"data: 2"]
            await response.aclose()
            await transport.aclose()

    run(main())


def test_pool_limit_queues_then_times_out() -> None:
    async def slow(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        await asyncio.sleep(0.3)
        await ok(_, writer)

    async def main() -> None:
        server = Server(slow)
        async with server as url:
            transport = PooledTransport(url, max_connections=2, keepalive_expiry=10)

            async def one(pool_timeout: float) -> int:
                response = await transport.send(request(), Timeouts(2, 2, 2, pool_timeout))
                await response.aread()
                await response.aclose()
                return response.status

            # Three requests on two connections: the third waits for a slot, then succeeds.
            assert await asyncio.gather(one(2), one(2), one(2)) == [200, 200, 200]
            assert server.connections == 2
            # With a pool timeout shorter than a request, the third gives up.
            results = await asyncio.gather(one(2), one(2), one(0.1), return_exceptions=True)
            assert results[:2] == [200, 200] and isinstance(results[2], httpx.PoolTimeout)
            # Slots were all given back.
            assert await asyncio.gather(one(2), one(2)) == [200, 200]
            await transport.aclose()

    run(main())


def test_connect_refused_and_read_timeout() -> None:
    async def silent(_: bytes, writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        await reader.read()  # never answers; returns when the client hangs up
        raise ConnectionError

    async def main() -> None:
        refused = PooledTransport(f"http://127.0.0.1:{free_port()}", max_connections=1, keepalive_expiry=1)
        with pytest.raises(httpx.ConnectError):
            await refused.send(request(), QUICK)
        server = Server(silent)
        async with server as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            with pytest.raises(httpx.ReadTimeout):
                await transport.send(request(), Timeouts(1, 0.2, 1, 1))
            # The timed-out connection was closed and its slot freed: the server sees the close.
            await asyncio.sleep(0.1)
            assert server.closed == 1
            with pytest.raises(httpx.ReadTimeout):
                await transport.send(request(), Timeouts(1, 0.2, 1, 0.1))
            await transport.aclose()

    run(main())


def test_a_kept_alive_connection_the_server_closes_as_it_is_reused_is_retried_on_a_new_one() -> None:
    """llama-server closes a connection after a streamed answer, and the close can arrive after the
    next request went down it: the server read none of it, so it goes again on a new connection.
    A new connection's failure stays the server's answer."""

    async def main() -> None:
        connections: list[int] = []

        async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            first = await read_request(reader)
            if b"close-now" not in first:
                await ok(first, writer)
                await read_request(reader)  # the next request arrives, and the close crosses it
            writer.close()

        server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = PooledTransport(f"http://127.0.0.1:{port}", max_connections=1, keepalive_expiry=10)
        for _ in range(3):
            response = await transport.send(request(), QUICK)
            assert response.status == 200 and await response.aread() == b"{}"
            response.close()
        assert len(connections) == 3  # the second and third went down a closing connection, then a new one
        with pytest.raises(httpx.ReadError):  # the retry's new connection closed too: not tried again
            await transport.send(request(body=b"close-now"), QUICK)
        assert len(connections) == 4
        await transport.aclose()
        server.close()

    run(main())


def test_a_server_that_accepts_and_closes_at_once_is_a_connect_error() -> None:
    """A load balancer or a Service with nothing behind it accepts and closes. Whether the close
    lands before the request is written (ConnectError: nothing was sent) or after (ReadError), it is
    an httpx error the request path knows, never asyncio's RuntimeError from a closed transport."""

    async def main() -> None:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = PooledTransport(f"http://127.0.0.1:{port}", max_connections=1, keepalive_expiry=1)
        for _ in range(20):  # wherever the close lands
            with pytest.raises((httpx.ConnectError, httpx.ReadError)):
                await transport.send(request(), QUICK)
        await transport.aclose()
        server.close()

    run(main())


def test_the_read_timeout_is_the_longest_silence_not_the_whole_answer() -> None:
    """A stream whose events come more often than the read timeout runs as long as it needs; one
    that falls silent times out about one read timeout after its last event, also when the
    answer started under a shorter first-byte timeout."""
    async def trickle(request: bytes, writer: asyncio.StreamWriter, *_: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.9 s in all, never more than 0.15 s apart
            await asyncio.sleep(0.15)
            writer.write(b"6\r\ntoken\n\r\n")
            await writer.drain()
        if b"/stall" in request:
            await asyncio.sleep(2)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(trickle) as url:
            transport = PooledTransport(url, max_connections=2, keepalive_expiry=10)
            timeouts = Timeouts(1, 0.4, 1, 1, first_byte=0.3)
            response = await transport.send(request(), timeouts)
            assert await response.aread() == b"token\n" * 6
            await response.aclose()
            response = await transport.send(request("/stall"), timeouts)
            chunks = 0
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.aiter_raw():
                    chunks += 1
                    last = asyncio.get_running_loop().time()
            silence = asyncio.get_running_loop().time() - last
            await response.aclose()
            assert chunks == 6 and 0.35 < silence < 0.8
            # Without a read timeout the body waits as long as it takes: the first-byte deadline
            # the head arrived under is not carried over to it.
            response = await transport.send(request(), Timeouts(1, None, 1, 1, first_byte=0.3))
            assert await response.aread() == b"token\n" * 6
            await response.aclose()
            await transport.aclose()

    run(main())


def test_broken_responses_raise_protocol_errors() -> None:
    async def truncated(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    async def garbage(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(truncated) as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            response = await transport.send(request(), QUICK)
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
            await response.aclose()
        async with Server(garbage) as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.send(request(), QUICK)

    run(main())


def test_closing_an_unfinished_response_closes_its_connection() -> None:
    async def endless(_: bytes, writer: asyncio.StreamWriter, *__: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async def main() -> None:
        server = Server(endless)
        async with server as url:
            transport = PooledTransport(url, max_connections=1, keepalive_expiry=10)
            response = await transport.send(request(), QUICK)
            await response.aiter_raw().__anext__()
            await response.aclose()
            for _ in range(100):
                if server.closed:
                    break
                await asyncio.sleep(0.01)
            assert server.closed == 1  # the backend learns that nobody is listening any more
            await transport.aclose()

    run(main())


def test_httpx_client_works_over_the_same_pool() -> None:
    async def main() -> None:
        server = Server(ok)
        async with server as url:
            transport = PooledTransport(url, max_connections=2, keepalive_expiry=10)
            async with httpx.AsyncClient(base_url=url, transport=transport) as client:
                first = await client.post("/v1/a", json={"x": 1})
                second = await client.get("/health")
                assert (first.status_code, first.json(), second.status_code) == (200, {}, 200)
                direct = await transport.send(request(), QUICK)
                await direct.aread()
                await direct.aclose()
            assert server.connections == 1
            assert server.requests[0].startswith(b"POST /v1/a HTTP/1.1\r\n")
            assert server.requests[1].startswith(b"GET /health HTTP/1.1\r\n")

    run(main())
