"""A lean HTTP/1.1 load generator for the benchmarks.

General-purpose clients (httpx) cost more CPU per request than the proxy itself, so on a
2-core machine they would be the bottleneck and hide the proxy's overhead. This one sends a
pre-encoded request over keep-alive connections on raw asyncio streams (uvloop) and parses
only what it must: the status line, Content-Length or chunked framing. For streams it notes
when the first body bytes arrive (time to first token) and reads to the end.
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    first_bytes: list[float] = field(default_factory=list)  # seconds to the first body chunk
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    @property
    def error_rate(self) -> float:
        total = self.count + self.errors
        return self.errors / total if total else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def build_request(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader, started: float) -> tuple[int, float]:
    """Read one response; return its status and the time its first body bytes arrived."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        first = 0.0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, first or time.perf_counter() - started
            await reader.readexactly(size + 2)
            if not first:
                first = time.perf_counter() - started
    start = lower.find(b"content-length:")
    length = int(lower[start + 15:lower.find(b"\r\n", start)]) if start >= 0 else 0
    first = time.perf_counter() - started
    await reader.readexactly(length)
    return status, first


async def run_load(url: str, request: bytes, *, concurrency: int, total: int, timeout: float = 30.0) -> LoadResult:
    """Send `total` copies of `request` over `concurrency` keep-alive connections."""
    parts = urlsplit(url)
    result = LoadResult()
    remaining = total

    async def connection() -> None:
        nonlocal remaining
        reader = writer = None
        while remaining > 0:
            remaining -= 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                started = time.perf_counter()
                writer.write(request)
                status, first = await asyncio.wait_for(_read_response(reader, started), timeout)  # type: ignore[arg-type]
                elapsed = time.perf_counter() - started
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.latencies.append(elapsed)
                    result.first_bytes.append(first)
                else:
                    result.errors += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - began
    return result


def run(url: str, request: bytes, *, concurrency: int, total: int) -> LoadResult:
    """Run a load in a fresh uvloop event loop (the fastest client we can be).

    The garbage collector is off while it runs, as timeit does: a full collection of the
    benchmarking process's heap (pytest, the suites' data) takes milliseconds, and landing in one
    run it would show up as the proxy's (or the backend's) tail latency."""
    gc.collect()
    gc.disable()
    try:
        try:
            import uvloop

            return uvloop.run(run_load(url, request, concurrency=concurrency, total=total))
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(run_load(url, request, concurrency=concurrency, total=total))
    finally:
        gc.enable()
