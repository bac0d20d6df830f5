"""The state machine of one on-demand backend, pure and driven by an explicit clock (`now`
arguments), so tests step through hours without sleeping:

    stopped --trigger--> starting --ready--> ready --idle/admin--> draining --> stopped
                            |                                                    ^
                            +--start failed--> failed (exponential backoff) -----+

Triggers: a request routed here by a keyword rule (`triggers.keywords`), or the volume of
requests that would have gone here (`triggers.volume`: N within a sliding window). No
flapping: `min_uptime` before an idle stop, `cooldown` before a start after a stop.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from ..policy import OnDemand

HISTORY = 64  # transitions kept per backend

log = logging.getLogger("dreamseed.scaling")

ScalerState = Literal["stopped", "starting", "ready", "draining", "failed"]
STATES: tuple[ScalerState, ...] = ("stopped", "starting", "ready", "draining", "failed")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one request for an on-demand backend."""

    action: Literal["forward", "wait", "fallback"]
    reason: str = ""  # why it cannot be forwarded now (stopped, starting, cooldown, ...)
    start: str | None = None  # a start was triggered, and by what


@dataclass
class BackendScaler:
    name: str
    settings: OnDemand
    state: ScalerState = "stopped"
    since: float = 0.0
    last_request: float | None = None
    ready_since: float | None = None
    stopped_at: float | None = None
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    last_reason: str = "initial"
    waiting: int = 0
    recent: deque[float] = field(default_factory=deque)
    # The latest transitions; bounded like the circuits' (a backend started and stopped daily
    # for a year would otherwise keep every one).
    history: deque[tuple[float, ScalerState, ScalerState, str]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def __post_init__(self) -> None:
        volume = self.settings.triggers.volume
        self.recent = deque(maxlen=volume.requests if volume else 1)

    def _move(self, now: float, state: ScalerState, reason: str) -> None:
        previous, self.state, self.since, self.last_reason = self.state, state, now, reason
        self.history.append((now, previous, state, reason))
        log.info("backend %s: %s -> %s (%s)", self.name, previous, state, reason)

    # --- requests ------------------------------------------------------------------

    def observe(self, now: float, *, keyword: bool) -> Verdict:
        """A request that would go to this backend arrived."""
        self.last_request = now
        trigger = self._trigger(now, keyword)
        if self.state == "ready":
            return Verdict("forward")
        if self.state == "starting":
            return self._hold_or_divert("starting")
        if self.state == "draining":
            return Verdict("fallback", "draining")
        if trigger is None:
            return Verdict("fallback", self.state)  # stopped or failed, and nothing calls for a start
        blocked = self.blocked(now)
        if blocked is not None:
            return Verdict("fallback", blocked)
        verdict = self._hold_or_divert("starting")
        return Verdict(verdict.action, verdict.reason, start=trigger)

    def _hold_or_divert(self, reason: str) -> Verdict:
        if self.settings.cold_start == "wait":
            if self.waiting < self.settings.max_waiting:
                return Verdict("wait", reason)
            return Verdict("fallback", "queue_full")
        return Verdict("fallback", reason)

    def _trigger(self, now: float, keyword: bool) -> str | None:
        triggers = self.settings.triggers
        volume = triggers.volume
        if volume is not None:
            self.recent.append(now)
        if keyword and triggers.keywords:
            return "keyword"
        if volume is not None and len(self.recent) == volume.requests and now - self.recent[0] <= volume.window:
            return f"volume ({volume.requests} requests in {volume.window:g} s)"
        return None

    def blocked(self, now: float) -> str | None:
        """Why a start may not begin now (cooldown after a stop, backoff after a failure)."""
        if self.state == "failed" and now < self.next_attempt:
            return "backoff"
        if self.stopped_at is not None and now < self.stopped_at + self.settings.cooldown:
            return "cooldown"
        return None

    # --- transitions the driver reports ---------------------------------------------

    def begin_start(self, now: float, reason: str) -> bool:
        """Stopped/failed -> starting; False when already starting or up (coalesced)."""
        if self.state not in ("stopped", "failed"):
            return False
        self._move(now, "starting", reason)
        return True

    def start_succeeded(self, now: float, reason: str = "ready") -> None:
        self.failures = 0
        self.last_error = None
        self.ready_since = now
        self._move(now, "ready", reason)

    def start_failed(self, now: float, error: str) -> None:
        self.failures += 1
        delay = min(self.settings.backoff_max, self.settings.backoff * 2 ** (self.failures - 1))
        self.next_attempt = now + delay
        self.last_error = error
        self._move(now, "failed", f"{error}; next attempt in {delay:g} s")

    def begin_stop(self, now: float, reason: str) -> bool:
        if self.state != "ready":
            return False
        self._move(now, "draining", reason)
        return True

    def stop_aborted(self, now: float, reason: str) -> None:
        """A draining backend turned out to be in use (another proxy process): back to ready."""
        self.last_request = now
        self._move(now, "ready", reason)

    def stop_finished(self, now: float, reason: str = "stopped") -> None:
        self.stopped_at = now
        self.ready_since = None
        self._move(now, "stopped", reason)

    def found_running(self, now: float) -> None:
        self.ready_since = now
        self._move(now, "ready", "found running")

    # --- idle ------------------------------------------------------------------------

    def last_activity(self) -> float:
        assert self.ready_since is not None
        return max(self.last_request or self.ready_since, self.ready_since)

    def next_idle_stop(self) -> float | None:
        if self.state != "ready" or self.ready_since is None:
            return None
        return max(self.last_activity() + self.settings.idle_stop, self.ready_since + self.settings.min_uptime)

    def idle_due(self, now: float, in_flight: int) -> bool:
        due = self.next_idle_stop()
        return due is not None and in_flight == 0 and now >= due


