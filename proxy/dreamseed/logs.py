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
import logging.handlers
import queue
import threading
import time
from collections.abc import Callable

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


class AccessLogQueue(logging.handlers.QueueHandler):
    """The access log's handler on the request path. It only puts the finished line in a bounded
    queue; a thread (logging's QueueListener) writes the queue to the real destination, so a slow
    disk or a full pipe holds up that thread, never the event loop. When the queue is full the
    line is dropped and counted (`dropped`, exported as dreamseed_access_log_dropped_total, and a
    warning on stderr at most once per REPEAT_INTERVAL_S): nothing is lost silently."""

    def __init__(self, destination: logging.Handler, capacity: int = ACCESS_LOG_BUFFER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lines: queue.Queue[logging.LogRecord] = queue.Queue(capacity)
        super().__init__(self.lines)
        self.dropped = 0
        self.writer = logging.handlers.QueueListener(self.lines, destination)
        self._clock = clock
        self._warned = -REPEAT_INTERVAL_S
        self._stopped = False

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is the finished JSON line: nothing to format or copy here

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            now = self._clock()
            if now - self._warned >= REPEAT_INTERVAL_S:
                self._warned = now
                logging.getLogger("dreamseed").warning(
                    "access log: its destination is not keeping up; %d lines dropped so far", self.dropped)

    def start(self) -> None:
        self.writer.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued, waiting at most ``timeout`` seconds for a blocked destination, and
        say on stderr what could not be written. Idempotent (shutdown calls it, then exit does).
        Not `close`: logging calls that whenever logging is configured again (uvicorn does, at
        start), and the writer must outlive that."""
        if self._stopped:
            return
        self._stopped = True
        stopping = threading.Thread(target=self._stop_writer, daemon=True)
        stopping.start()
        stopping.join(timeout)
        log = logging.getLogger("dreamseed")
        if stopping.is_alive():
            log.warning("access log: %d lines not written at shutdown (the destination is blocked)", self.lines.qsize())
        if self.dropped:
            log.warning("access log: %d lines were dropped while the destination was not keeping up", self.dropped)

    def _stop_writer(self) -> None:
        if self.writer._thread is not None:
            self.writer.stop()
