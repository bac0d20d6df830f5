"""The floor under the proxy's overhead, for the benchmarks: uvicorn (uvloop, httptools, as
`dreamseed serve` runs it) and a bare ASGI function that forwards each request to one backend over
the proxy's own connection pool (proxy/dreamseed/transport.py), and nothing else: no keys, no
parsing, no routing, no metrics, no access log, no limits.

Measured next to the proxy in the same run (test_user_config.py, variant `floor`), it says how much
of what the proxy adds is the cost of any Python proxy built on this server and this pool on this
machine, and how much is the proxy's own features.

    python3 benchmarks/bare_forwarder.py BACKEND_URL MODEL
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import uvicorn

from dreamseed.transport import PooledTransport, Timeouts

TIMEOUTS = Timeouts(connect=5, read=30, write=10, pool=10)


def forwarder(backend: str, model: str) -> Any:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {backend.split('//', 1)[1]}\r\ncontent-type: application/json\r\n"
    pool: list[PooledTransport] = []  # made in the server's event loop, on the first request

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        # The one change a router must make: the model id the backend knows.
        body = b"".join(chunks).replace(b'"model": "auto"', f'"model": "{model}"'.encode(), 1)
        if not pool:
            pool.append(PooledTransport(backend, max_connections=512, keepalive_expiry=4.0))
        response = await pool[0].send(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body, TIMEOUTS)
        try:
            if (response.header(b"content-type") or b"").startswith(b"text/event-stream"):  # relayed as it comes
                await send({"type": "http.response.start", "status": response.status,
                            "headers": [(b"content-type", b"text/event-stream")]})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            answer = await response.aread()
        finally:
            await response.aclose()
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app


def main() -> None:
    backend, model = sys.argv[1], sys.argv[2]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"bare forwarder listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(forwarder(backend, model), loop="uvloop", http="httptools", access_log=False,
                            log_level="warning", proxy_headers=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
