"""Diagnostics logging for `dreamseed serve`: repeated warnings are rate-limited.

A backend that is down or a RAG store that is degraded affects every request; logging one line
per request drowned the log (548 identical lines for 548 requests) and cut throughput to a
fifth. The same warning (same logger, same message template) is written at most once per
interval; the next one that is written says how many were suppressed in between, so nothing
is lost silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REPEAT_INTERVAL_S = 10.0


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
