"""What each way of failing to get an answer from a backend means, in one table (as httpx's
`map_httpcore_exceptions` maps its transport's exceptions): whether it counts against the
backend's circuit, whether the same backend is tried again, whether the chain moves on to the
next backend, and otherwise the error the client gets."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ..transport import FirstByteTimeout, QueueFull


@dataclass(frozen=True, slots=True)
class Failure:
    """One row of the table. Texts may name `{name}` (the backend), `{limit}` (its
    max_concurrency), `{exc}` (the exception's message) and `{type}` (its class)."""

    circuit: str | None  # recorded as a failure on the backend's circuit (None: not the backend's fault)
    retry: bool  # the same backend again, after a backoff, while it has retries left
    skip: str | None  # then the next backend of the chain, with this reason (x-dreamseed-fallback)
    skip_needs_fallback: bool  # ...only when there is a next backend; the error below otherwise
    timed_out: bool  # makes the chain's final error backend_timeout rather than backend_unreachable
    code: str | None  # the error answered when the chain does not move on
    message: str = ""
    busy: bool = False  # a full backend: answered at once with Retry-After, nothing recorded

    def describe(self, text: str, exc: Exception, name: str, limit: int) -> str:
        return text.format(name=name, limit=limit, exc=exc, type=type(exc).__name__)


BUSY = "backend {name!r} is at its limit of {limit} concurrent requests and {why}; retry shortly"

# Most specific first: QueueFull is a PoolTimeout, which like ConnectTimeout and FirstByteTimeout is a
# TimeoutException, and all of them are HTTPErrors.
FAILURES: tuple[tuple[type[httpx.HTTPError], Failure], ...] = (
    (QueueFull, Failure(None, False, None, False, False, "backend_busy",
                        BUSY.replace("{why}", "the wait queue is full"), busy=True)),
    (httpx.PoolTimeout, Failure(None, False, None, False, False, "backend_busy",
                                BUSY.replace("{why}", "no slot freed up in time"), busy=True)),
    (httpx.ConnectTimeout, Failure("{exc}", True, "unreachable", False, True, None)),
    (httpx.ConnectError, Failure("{exc}", True, "unreachable", False, False, None)),
    # A hung backend: along the chain at once, no retry.
    (FirstByteTimeout, Failure("{exc}", False, "first_byte_timeout", True, True, "backend_timeout",
                               "backend {name!r} did not start answering within its first_byte timeout")),
    # It accepted the request: its silence or broken answer is the answer.
    (httpx.TimeoutException, Failure("read timeout", False, None, False, True, "backend_timeout",
                                     "backend {name!r} did not answer in time")),
    (httpx.HTTPError, Failure("{type}", False, None, False, False, "backend_error", "backend {name!r} failed: {type}")),
)


def failure_of(exc: httpx.HTTPError) -> Failure:
    """The first row whose exception class `exc` is an instance of."""
    for kind, failure in FAILURES:
        if isinstance(exc, kind):
            return failure
    raise AssertionError("httpx.HTTPError closes the table")  # pragma: no cover
