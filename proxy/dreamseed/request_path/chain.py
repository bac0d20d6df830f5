"""The routing decision's chain, tried in order: the first backend that answers is the answer.

Each backend's replicas come in the order its balancing gives (balancing.py), so a request fails
over to another replica of the same backend before the chain moves on. A replica is skipped when
it is not configured or its circuit is open, and after its attempts (attempt.py) when it cannot be
reached, hangs before answering, or answers 502/503 with another replica or backend still to try.
Once a replica has accepted the request otherwise, its answer, or its error, goes to the client.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import msgspec

from ..backends import Upstreams
from ..balancing import conversation_key
from ..errors import ProxyError
from ..exchange import Exchange, usage_of
from ..routing import Decision
from ..transport import UpstreamResponse
from .attempt import send_with_retries
from .backend_errors import openai_error
from .responses import BufferedResponse, RelayedStream, raw_headers


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
    """Try the decision's chain and return the first backend's response.

    ``headers`` are the x-dreamseed-* and x-request-id headers for the client; the request id is
    forwarded to the backend too, with the client headers in ``passed_on``.
    """
    skipped = exchange.fallbacks  # the access log and metrics see what was skipped, and why
    exchange.stream = stream
    timed_out = False
    retry_after: float | None = None
    outbound = [*passed_on, (b"x-request-id", headers["x-request-id"].encode())]
    chain = decision.chain
    key: bytes | None = None
    steps = [(name, upstreams[name]) for name in chain]
    for position, (name, replicas) in enumerate(steps):
        if len(replicas.replicas) > 1 and replicas.backend.balance == "prefix_affinity" and key is None:
            key = conversation_key(payload)
        order = replicas.order(key)
        reserved = False
        if len(order) > 1:
            # The first replica in the balancing's order that has a free slot now goes first, its slot
            # taken at once: a request waits only when every replica is full (other workers fill
            # slots between the order and the send).
            for position_in_order, upstream in enumerate(order):
                circuit = upstream.circuit
                if upstream.transport is not None and circuit is not None and circuit.allows_requests() \
                        and upstream.transport.reserve():
                    order = [upstream, *order[:position_in_order], *order[position_in_order + 1:]]
                    reserved = True
                    break
        body: bytes | None = None
        for turn, upstream in enumerate(order):
            circuit = upstream.circuit
            if upstream.transport is None or circuit is None:
                skipped.append(f"{upstream.label}:unavailable")
                continue
            if not circuit.allows_requests():
                skipped.append(f"{upstream.label}:circuit_open")
                retry_after = min(retry_after if retry_after is not None else 1e9, circuit.retry_after())
                continue
            if body is None:
                payload["model"] = upstream.backend.model
                body = msgspec.json.encode(payload)
            data = upstream.request_bytes(path, body, outbound)
            exchange.backend = name
            exchange.upstream_started = time.perf_counter()
            more = turn < len(order) - 1 or position < len(steps) - 1
            attempt = await send_with_retries(upstream, data, more, headers, reserved and turn == 0)
            response = attempt.response
            if response is None:
                assert attempt.skipped is not None
                skipped.append(attempt.skipped)
                if attempt.timed_out is not None:
                    timed_out = attempt.timed_out
                continue
            return await _answer(name, upstream.label, response, stream, headers, skipped, exchange)

    if retry_after is not None and all(s.endswith(":circuit_open") for s in skipped):
        raise ProxyError(
            "no_healthy_backend",
            f"no healthy backend for rule {decision.rule!r} (tried: {', '.join(skipped)})",
            headers={**headers, "x-dreamseed-fallback": ", ".join(skipped),
                     "retry-after": str(max(1, round(retry_after)))},
        )
    raise ProxyError(
        "backend_timeout" if timed_out else "backend_unreachable",
        f"no backend for rule {decision.rule!r} could be reached (tried: {', '.join(skipped)})",
        headers={**headers, "x-dreamseed-fallback": ", ".join(skipped)},
    )


async def _answer(name: str, label: str, response: UpstreamResponse, stream: bool, headers: dict[str, str],
                  skipped: list[str], exchange: Exchange) -> BufferedResponse | RelayedStream:
    """The response of the replica that answered, relayed or buffered."""
    headers["x-dreamseed-backend"] = name
    if label != name:  # one of several replicas
        headers["x-dreamseed-replica"] = label
    if skipped:
        headers["x-dreamseed-fallback"] = ", ".join(skipped)
    media_type = response.header(b"content-type") or b"application/json"
    out = [(b"content-type", media_type), *raw_headers(headers)]
    if stream and response.status == 200 and media_type.startswith(b"text/event-stream"):
        return RelayedStream(response, name, out, exchange)
    return await _buffered(name, response, headers, out, exchange)


async def _buffered(name: str, response: UpstreamResponse, headers: dict[str, str],
                    out: list[tuple[bytes, bytes]], exchange: Exchange) -> BufferedResponse:
    try:
        body = await response.aread()
    except httpx.TimeoutException:
        raise ProxyError("backend_timeout", f"backend {name!r} did not finish its answer in time",
                         headers=headers) from None
    except httpx.HTTPError as exc:
        raise ProxyError("backend_error", f"backend {name!r} broke off its answer: {type(exc).__name__}",
                         headers=headers) from None
    finally:
        response.close()
        exchange.upstream_done = time.perf_counter()
    if response.status == 200:
        counts = usage_of(body)
        if counts is not None:
            exchange.prompt_tokens, exchange.completion_tokens = counts
    elif response.status >= 400:
        body = openai_error(response.status, body)
        out = [(b"content-type", b"application/json"), *out[1:]]
    return BufferedResponse(response.status, out, body, exchange)
