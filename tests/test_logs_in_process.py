"""The access log's buffer and writer thread (logs.AccessLogQueue), in process: every line put is
written once, in order, soon, whatever the writer is doing when it arrives; a full buffer drops
and counts. (tests/test_metrics.py checks the same through a real `dreamseed serve` and a stalled
reader.) And the line itself: each field of a request's Exchange under its own key."""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time

import pytest

from dreamseed.exchange import Exchange
from dreamseed.logs import AccessLogQueue, access_logger
from dreamseed.metrics import log_exchange


class Destination(io.RawIOBase):
    """A file-like destination that records each write and can be made to block."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.open_gate = threading.Event()
        self.open_gate.set()
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        self.open_gate.wait()
        with self.lock:
            self.data += chunk
            self.writes += 1
        return len(chunk)

    def text(self) -> bytes:
        with self.lock:
            return bytes(self.data)


def wait_for(condition, timeout: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def test_a_line_put_in_any_phase_of_the_writer_is_written_soon_once_and_in_order() -> None:
    """Lines arrive while the writer sleeps with nothing to do, while it gathers, and while it
    writes: each must reach the destination within a gather interval or so (a lost wake-up would
    leave it waiting for the next line), and none twice."""
    destination = Destination()
    sink = AccessLogQueue(destination, capacity=100_000)
    sink.GATHER_S = 0.01
    sink.start()
    rng = random.Random(5)
    try:
        for n in range(300):
            line = b"line %d\n" % n
            sink.put(line)
            if rng.random() < 0.3:  # sometimes wait until it is out, so the writer goes idle again
                assert wait_for(lambda line=line: destination.text().endswith(line)), f"line {n} never written"
            else:
                time.sleep(rng.choice((0.0, 0.0005, 0.003, 0.012)))
        assert wait_for(lambda: destination.text().endswith(b"line 299\n"))
    finally:
        sink.stop()
    assert destination.text() == b"".join(b"line %d\n" % n for n in range(300))
    assert sink.dropped == 0 and sink.queued == 0
    assert destination.writes < 300  # batched: the writer does not wake once per line


def test_a_blocked_destination_fills_the_buffer_then_lines_are_dropped_and_counted() -> None:
    destination = Destination()
    destination.open_gate.clear()  # the writer blocks in its first write
    sink = AccessLogQueue(destination, capacity=50)
    sink.GATHER_S = 0.0
    sink.start()
    sink.put(b"first\n")
    assert wait_for(lambda: sink.queued == 0)  # taken by the writer, which is now stuck
    started = time.perf_counter()
    for n in range(80):
        sink.put(b"%d\n" % n)  # never blocks the caller
    assert time.perf_counter() - started < 0.5
    assert sink.queued == 50 and sink.dropped == 30
    destination.open_gate.set()
    sink.stop()
    assert destination.text() == b"first\n" + b"".join(b"%d\n" % n for n in range(50))


def test_stop_writes_what_is_queued_and_gives_up_on_a_destination_that_stays_blocked() -> None:
    destination = Destination()
    sink = AccessLogQueue(destination)
    sink.start()
    for n in range(5):
        sink.put(b"%d\n" % n)
    sink.stop()
    assert destination.text() == b"0\n1\n2\n3\n4\n"

    stuck = Destination()
    stuck.open_gate.clear()
    blocked = AccessLogQueue(stuck)
    blocked.GATHER_S = 0.0
    blocked.start()
    blocked.put(b"a\n")
    assert wait_for(lambda: blocked.queued == 0)
    blocked.put(b"b\n")
    started = time.monotonic()
    blocked.stop(timeout=0.2)  # returns, and says on stderr that a line was not written
    assert time.monotonic() - started < 1.0 and blocked.queued == 1
    stuck.open_gate.set()


@pytest.mark.parametrize("prompt", [None, "빠른 답 please"])
def test_the_access_log_line_has_every_field_of_the_exchange_under_its_own_key_in_the_documented_order(
        prompt: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """log_exchange builds the line positionally (metrics.AccessLogLine): a value one place off
    would land under its neighbour's key. Every field gets a value no other field has."""
    started = time.perf_counter() - 2.0
    exchange = Exchange("req-1", "chat", started=started, stream=True, rule="code", backend="fast",
                        fallbacks=["code:starting"], status=502, error="upstream_error",
                        first_byte=started + 0.25, prompt_tokens=11, completion_tokens=7, prompt=prompt,
                        rag="hits", rag_hits=3, rag_seconds=0.0125)
    with caplog.at_level(logging.INFO, logger=access_logger.name):
        log_exchange(exchange)
    (record,) = [r for r in caplog.records if r.name == access_logger.name]
    line = json.loads(record.getMessage())
    documented = ["ts", "request_id", "endpoint", "stream", "rule", "backend", "fallback", "status", "error",
                  "duration_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "rag", "rag_hits", "rag_ms"]
    assert list(line) == documented + (["prompt"] if prompt is not None else [])  # docs/operations.md's order
    assert abs(line.pop("ts") - time.time()) < 5
    assert 2000 <= line.pop("duration_ms") < 7000
    assert line == {"request_id": "req-1", "endpoint": "chat", "stream": True, "rule": "code", "backend": "fast",
                    "fallback": ["code:starting"], "status": 502, "error": "upstream_error", "ttft_ms": 250.0,
                    "prompt_tokens": 11, "completion_tokens": 7, "rag": "hits", "rag_hits": 3, "rag_ms": 12.5,
                    **({"prompt": prompt} if prompt is not None else {})}
