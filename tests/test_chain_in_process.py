"""The chain loop, its retries and the transport failures' table, in process: each backend's pool is
replaced by a scripted fake (as httpx.MockTransport stands in for a server), so every retry,
fallback and error is decided by request_path/ alone, with no process or socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from dreamseed.backends import Upstreams
from dreamseed.errors import ERRORS, ProxyError
from dreamseed.exchange import Exchange
from dreamseed.policy import Catalog, load_policies
from dreamseed.request_path import BufferedResponse, RelayedStream
from dreamseed.request_path.attempt import RETRYABLE_STATUS
from dreamseed.request_path.chain import forward
from dreamseed.request_path.failures import FAILURES
from dreamseed.routing import Decision
from dreamseed.transport import FirstByteTimeout, QueueFull
from support import write_policies


@dataclass
class FakeResponse:
    status: int
    body: bytes = b'{"ok": true}'
    media_type: bytes = b"application/json"
    closed: bool = False

    def header(self, name: bytes) -> bytes | None:
        return self.media_type if name == b"content-type" else None

    async def aread(self) -> bytes:
        return self.body

    def close(self) -> None:
        self.closed = True


@dataclass
class FakePool:
    """What a backend does with each request sent to it, in order: an exception to raise or a status."""

    name: str
    script: list[Exception | int]
    log: list[str]
    authority: str = "fake:1"
    answers: list[FakeResponse] = field(default_factory=list)

    async def send(self, data: bytes, timeouts: Any, *, reserved: bool = False) -> FakeResponse:
        self.log.append(self.name)
        outcome = self.script.pop(0) if self.script else 200
        if isinstance(outcome, Exception):
            raise outcome
        answer = FakeResponse(outcome)
        self.answers.append(answer)
        return answer

    async def aclose(self) -> None:
        pass


@pytest.fixture
def catalog(tmp_path: Any) -> Iterator[Catalog]:
    backends = {name: {"url": f"http://127.0.0.1:{9000 + i}", "model": f"model-{name}", "context_length": 1024,
                       "retries": 2, "health": {"unhealthy_threshold": 10}} for i, name in enumerate("abc")}
    yield load_policies(write_policies(tmp_path / "p", backends, {"rules": [{"name": "default", "target": "a"}]})).catalog


def run_chain(catalog: Catalog, scripts: dict[str, list[Exception | int]], chain: tuple[str, ...] = ("a", "b", "c"),
              stream: bool = False) -> tuple[BufferedResponse | RelayedStream | ProxyError, list[str], Exchange,
                                             Upstreams]:
    upstreams = Upstreams.from_catalog(catalog, {})
    sent: list[str] = []
    for name in catalog.backends:
        upstreams[name].replicas[0].transport = FakePool(name, list(scripts.get(name, [])), sent)  # type: ignore[assignment]
    exchange = Exchange("req-1", "chat")
    decision = Decision("default", chain, "test")
    headers = {"x-request-id": "req-1", "x-dreamseed-rule": "default"}

    async def go() -> BufferedResponse | RelayedStream | ProxyError:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("dreamseed.request_path.attempt.backoff", lambda attempt: 0.0)
            try:
                return await forward(upstreams, decision, "/v1/chat/completions", {"model": "auto"}, stream, headers,
                                     [], exchange)
            except ProxyError as exc:
                return exc

    return asyncio.run(go()), sent, exchange, upstreams


def test_a_backend_is_retried_before_the_first_byte_then_answers(catalog: Catalog) -> None:
    connect = httpx.ConnectError("refused")
    answer, sent, exchange, upstreams = run_chain(catalog, {"a": [connect, 503]})
    assert isinstance(answer, BufferedResponse) and answer.status == 200
    assert sent == ["a", "a", "a"] and exchange.fallbacks == [] and exchange.backend == "a"
    circuit = upstreams["a"].replicas[0].circuit
    assert circuit is not None and circuit.failures == 0  # the success reset it
    assert sorted(RETRYABLE_STATUS) == [502, 503]


def test_the_chain_is_tried_in_order_and_the_header_says_what_was_skipped_and_why(catalog: Catalog) -> None:
    connect = httpx.ConnectError("refused")
    answer, sent, exchange, _ = run_chain(catalog, {"a": [connect, connect, connect], "b": [FirstByteTimeout("hung")],
                                                    "c": [200]})
    assert isinstance(answer, BufferedResponse)
    assert sent == ["a", "a", "a", "b", "c"]  # a's retries, then b once (a hang is not retried), then c
    assert exchange.fallbacks == ["a:unreachable", "b:first_byte_timeout"]
    assert (b"x-dreamseed-fallback", b"a:unreachable, b:first_byte_timeout") in answer.headers
    assert (b"x-dreamseed-backend", b"c") in answer.headers


def test_a_busy_answer_moves_on_only_while_another_backend_remains(catalog: Catalog) -> None:
    answer, sent, exchange, _ = run_chain(catalog, {"a": [503, 503, 503], "b": [502, 502, 502]}, chain=("a", "b"))
    # The last backend's own 502 goes to the client: it is the backend's answer, not the proxy's.
    assert isinstance(answer, BufferedResponse) and answer.status == 502
    assert sent == ["a"] * 3 + ["b"] * 3 and exchange.fallbacks == ["a:http_503"]


def test_open_circuits_are_skipped_without_a_request_and_all_open_is_503_with_retry_after(catalog: Catalog) -> None:
    upstreams = Upstreams.from_catalog(catalog, {})
    for name in "ab":
        circuit = upstreams[name].replicas[0].circuit
        assert circuit is not None
        for _ in range(10):
            circuit.record_failure("down")
    sent: list[str] = []
    for name in "abc":
        upstreams[name].replicas[0].transport = FakePool(name, [], sent)  # type: ignore[assignment]
    exchange = Exchange("req-2", "chat")

    async def go(chain: tuple[str, ...]) -> BufferedResponse | RelayedStream | ProxyError:
        try:
            return await forward(upstreams, Decision("default", chain, "test"), "/v1/chat/completions",
                                 {"model": "auto"}, False, {"x-request-id": "req-2"}, [], exchange)
        except ProxyError as exc:
            return exc

    served = asyncio.run(go(("a", "b", "c")))
    assert isinstance(served, BufferedResponse) and sent == ["c"]
    assert exchange.fallbacks == ["a:circuit_open", "b:circuit_open"]
    refused = asyncio.run(go(("a", "b")))
    assert isinstance(refused, ProxyError) and refused.code == "no_healthy_backend" and refused.status == 503
    assert int(refused.headers["retry-after"]) >= 1 and sent == ["c"]


# Each failure on the only backend of a chain: the error the client gets, and whether the circuit counts it.
# The table's order matters: a QueueFull is a PoolTimeout, both and ConnectTimeout are TimeoutExceptions,
# FirstByteTimeout is a ReadTimeout, and every one is an httpx.HTTPError.
EXPECTED = [
    (QueueFull("full"), 429, "backend_busy", "the wait queue is full", False, 1),
    (httpx.PoolTimeout("slow"), 429, "backend_busy", "no slot freed up in time", False, 1),
    (httpx.ConnectTimeout("slow"), 504, "backend_timeout", "could be reached (tried: a:unreachable)", True, 3),
    (httpx.ConnectError("refused"), 502, "backend_unreachable", "could be reached (tried: a:unreachable)", True, 3),
    (FirstByteTimeout("hung"), 504, "backend_timeout", "did not start answering within its first_byte", True, 1),
    (httpx.ReadTimeout("slow"), 504, "backend_timeout", "did not answer in time", True, 1),
    (httpx.WriteTimeout("slow"), 504, "backend_timeout", "did not answer in time", True, 1),
    (httpx.RemoteProtocolError("garbled"), 502, "backend_error", "failed: RemoteProtocolError", True, 1),
    (httpx.ReadError("reset"), 502, "backend_error", "failed: ReadError", True, 1),
]


@pytest.mark.parametrize(("failure", "status", "code", "says", "counted", "tries"), EXPECTED,
                         ids=[type(case[0]).__name__ for case in EXPECTED])
def test_each_transport_failure_gets_its_error(catalog: Catalog, failure: Exception, status: int, code: str, says: str,
                                               counted: bool, tries: int) -> None:
    answer, sent, exchange, upstreams = run_chain(catalog, {"a": [failure] * 3}, chain=("a",))
    assert isinstance(answer, ProxyError)
    assert (answer.status, answer.code, answer.type) == (status, code, ERRORS[code].type)
    assert says in answer.message and sent == ["a"] * tries
    circuit = upstreams["a"].replicas[0].circuit
    assert circuit is not None and (circuit.failures > 0) is counted
    if code == "backend_busy":
        assert answer.headers["retry-after"] == "1" and answer.headers["x-dreamseed-backend"] == "a"


def test_the_table_covers_every_failure_and_ends_with_the_catch_all() -> None:
    assert FAILURES[-1][0] is httpx.HTTPError
    kinds = [kind for kind, _ in FAILURES]
    for index, kind in enumerate(kinds):  # no row is shadowed by a broader one before it
        assert not any(issubclass(kind, earlier) for earlier in kinds[:index]), kind
