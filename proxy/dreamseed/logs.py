"""Logging for `dreamseed serve`: repeated warnings are rate-limited, and the access log is
written off the event loop.

A backend that is down or a RAG store that is degraded affects every request; logging one line
per request drowned the log (548 identical lines for 548 requests) and cut throughput to a
fifth. The same warning (same logger, same message template) is written at most once per
interval; the next one that is written says how many were suppressed in between, so nothing
is lost silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

REPEAT_INTERVAL_S = 10.0
ACCESS_LOG_BUFFER = 10_000  # lines: several seconds of a busy proxy's log, about 4 MB


class RepeatLimiter(logging.Filter):
    """Let the first WARNING-or-worse record of each (logger, template) through, then at most
    one per `interval` seconds, noting how many were held back."""

    def __init__(self, interval: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {now - last:.0f} s were not logged]" \
                if last is not None else record.msg
        if len(self._last) > 10_000:  # templates are few; this only guards against unbounded keys
            self._last.clear()
        return True


def install(handler: logging.Handler, interval: float = REPEAT_INTERVAL_S) -> RepeatLimiter:
    limiter = RepeatLimiter(interval)
    handler.addFilter(limiter)
    return limiter


class AccessLogQueue:
    """The access log, off the event loop. The request path only appends the finished line (bytes)
    to a bounded buffer; a thread of its own writes what has gathered in one write and one flush
    per batch, so a slow disk or a full pipe holds up that thread, never the event loop. When the
    buffer is full the line is dropped and counted (`dropped`, exported as
    dreamseed_access_log_dropped_total, and a warning on stderr at most once per REPEAT_INTERVAL_S):
    nothing is lost silently.

    Not logging's QueueHandler: its record machinery (a LogRecord per line, the caller lookup, a
    handler call per record) and a write plus flush per line made the access log a large share of
    the proxy's CPU (docs/decisions/access-log-queue.md). The buffer is a deque, not a queue.Queue,
    whose put takes a lock and notifies a condition: the event loop is the only producer, and the
    writer is woken only when it sleeps with nothing to write, once per batch."""

    BATCH = 4096  # lines per write at most: bounded memory while catching up
    # After the first line of a batch the writer waits this long for more, so a busy proxy wakes
    # the thread (and hands it the GIL) once per batch instead of once per line; a line reaches its
    # destination at most this much later.
    GATHER_S = 0.05

    def __init__(self, destination: BinaryIO, capacity: int = ACCESS_LOG_BUFFER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lines: deque[bytes] = deque()
        self.capacity = capacity
        self.destination = destination
        self.dropped = 0
        self._clock = clock
        self._warned = -REPEAT_INTERVAL_S
        # The writer sets `_idle` before it looks for lines and sleeps on `_wake` only if it found
        # none; put() sets `_wake` only when `_idle` is set. Appends and pops on a deque are atomic,
        # so a line put while the writer decides either is seen by its look or wakes it.
        self._idle = False
        self._wake = threading.Event()
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Lines waiting for the writer."""
        return len(self.lines)

    def put(self, line: bytes) -> None:
        """One finished line (newline included), from the event loop's thread: never blocks."""
        if len(self.lines) >= self.capacity:
            self._drop()
            return
        self.lines.append(line)
        if self._idle:
            self._idle = False
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        now = self._clock()
        if now - self._warned >= REPEAT_INTERVAL_S:
            self._warned = now
            logging.getLogger("dreamseed").warning(
                "access log: its destination is not keeping up; %d lines dropped so far", self.dropped)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write, name="dreamseed-access-log", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        lines = self.lines
        while True:
            self._idle = True
            if not lines and not self._closing:
                self._wake.wait()
            self._wake.clear()
            self._idle = False
            if not self._closing:
                time.sleep(self.GATHER_S)
            batch: list[bytes] = []
            while lines and len(batch) < self.BATCH:
                batch.append(lines.popleft())
            if batch:
                try:
                    self.destination.write(b"".join(batch))
                    self.destination.flush()
                except (OSError, ValueError) as exc:  # a closed pipe or file: say so, keep serving
                    logging.getLogger("dreamseed").warning("access log: cannot write: %s", exc)
            if self._closing and not lines:
                return

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued, waiting at most ``timeout`` seconds for a blocked destination, and
        say on stderr what could not be written. Idempotent (shutdown calls it, then exit does)."""
        if self._stopped:
            return
        self._stopped = True
        log = logging.getLogger("dreamseed")
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("access log: %d lines not written at shutdown (the destination is blocked)",
                            len(self.lines))
        if self.dropped:
            log.warning("access log: %d lines were dropped while the destination was not keeping up", self.dropped)


_sink: AccessLogQueue | None = None
# Where metrics.log_exchange sends lines when no queue is set: the app run without `serve`.
access_logger = logging.getLogger("dreamseed.access")


def set_access_log(sink: AccessLogQueue | None) -> None:
    """Where this process's access log lines go (None: the access log is off)."""
    global _sink
    _sink = sink


def access_log_sink() -> AccessLogQueue | None:
    return _sink
