"""One server of the chain: send the request, retrying while nothing has reached the client.

Retries happen only before the first byte of an answer, on what failures.py marks retryable and on
502/503, with full-jitter backoff, up to the backend's `retries`. The outcome is the backend's
response, a reason to move along the chain, or a ProxyError to answer with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import httpx

from ..backends import Upstream
from ..errors import ProxyError
from ..transport import UpstreamResponse
from .failures import failure_of

log = logging.getLogger("dreamseed.forwarding")

RETRYABLE_STATUS = frozenset({502, 503})


def backoff(attempt: int) -> float:
    """Full jitter: a random wait up to 50 ms, 100 ms, 200 ms... (at most 1 s)."""
    return random.uniform(0, min(1.0, 0.05 * 2**attempt))


@dataclass(slots=True)
class Attempt:
    response: UpstreamResponse | None  # the answer to relay, or None: move along the chain
    skipped: str | None = None  # why, as "name:reason"
    timed_out: bool | None = None  # whether that was a timeout (None: a backend's answer, which says neither)


async def send_with_retries(upstream: Upstream, data: bytes, has_fallback: bool, headers: dict[str, str],
                            reserved: bool = False) -> Attempt:
    """Send `data` (a complete request) to one backend of the chain. `headers` are the client's
    x-dreamseed-* headers, for an error answered from here; `reserved`: the first attempt's slot is
    already taken (a replica chosen for having one free)."""
    transport, timeouts, circuit = upstream.transport, upstream.timeouts, upstream.circuit
    assert transport is not None and timeouts is not None and circuit is not None
    name = upstream.label  # the backend's name, or name#2... for its other replicas
    attempts = 1 + upstream.backend.retries
    for attempt in range(attempts):
        started = time.perf_counter()
        try:
            response = await transport.send(data, timeouts, reserved=reserved and attempt == 0)
        except httpx.HTTPError as exc:
            failure = failure_of(exc)
            if failure.circuit is not None:
                circuit.record_failure(failure.describe(failure.circuit, exc, name, 0))
            if failure.retry and attempt + 1 < attempts:
                await asyncio.sleep(backoff(attempt))
                continue
            if failure.skip is not None and (has_fallback or not failure.skip_needs_fallback):
                log.warning("backend %s: %s (%s)", name, failure.skip.replace("_", " "), exc)
                return Attempt(None, f"{name}:{failure.skip}", failure.timed_out)
            assert failure.code is not None
            extra = {"retry-after": "1"} if failure.busy else {}
            raise ProxyError(failure.code, failure.describe(failure.message, exc, name, upstream.backend.max_concurrency),
                             headers={**headers, "x-dreamseed-backend": name, **extra}) from None
        if response.status in RETRYABLE_STATUS:
            circuit.record_failure(f"answered {response.status}")
            if attempt + 1 < attempts:
                response.close()
                await asyncio.sleep(backoff(attempt))
                continue
            if has_fallback:  # else the last backend's own answer goes to the client
                response.close()
                return Attempt(None, f"{name}:http_{response.status}")
            return Attempt(response)
        if response.status >= 500:
            circuit.record_failure(f"answered {response.status}")
        else:
            circuit.record_success()
            upstream.observe(time.perf_counter() - started)
        return Attempt(response)
    raise AssertionError("every attempt returns or continues")  # pragma: no cover
