"""Backend health: a circuit breaker per backend, fed by active probes and by real requests.

closed     requests flow; consecutive failures are counted (probe failures, connection
           errors, timeouts, 502/503/504 answers). `unhealthy_threshold` of them opens it.
open       routing skips the backend and follows the rule's fallback chain. After `cooldown`
           the circuit goes half-open.
half_open  the next probe decides: `healthy_threshold` successes close it, a failure opens it
           again for another cooldown. Requests still skip it until it closes.

Probes GET the backend's /health every `interval` (from the catalog's `health:` block).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import httpx

from .policy import HealthCheck

HISTORY = 64  # transitions kept per circuit

log = logging.getLogger("dreamseed.health")

CircuitState = Literal["closed", "open", "half_open"]


@dataclass
class Circuit:
    name: str
    settings: HealthCheck
    clock: Callable[[], float] = time.monotonic
    state: CircuitState = "closed"
    failures: int = 0
    successes: int = 0
    opened_at: float = 0.0
    last_error: str | None = None
    probed: bool = False  # has any probe or request reported yet
    # An on-demand backend the scaler has stopped: no probes (they would only fail), and the
    # scaler, not the circuit, says whether it can take requests.
    paused: bool = False
    # The latest transitions (for tests and debugging); bounded, since a flapping backend would
    # otherwise grow it for the life of the process.
    transitions: deque[tuple[CircuitState, CircuitState, str]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def allows_requests(self) -> bool:
        if self.state == "open" and self.clock() - self.opened_at >= self.settings.cooldown:
            self._move("half_open", "cooldown over")
        return self.state == "closed"

    def retry_after(self) -> float:
        """Seconds until the circuit may be tried again."""
        if self.state != "open":
            return self.settings.interval
        return max(0.0, self.settings.cooldown - (self.clock() - self.opened_at))

    def reset(self, why: str) -> None:
        """Closed, counters cleared: the backend was (re)started."""
        self.failures = self.successes = 0
        self.last_error = None
        if self.state != "closed":
            self._move("closed", why)

    def record_success(self) -> None:
        self.probed = True
        self.failures = 0
        self.last_error = None
        if self.state == "closed":
            return
        if self.state == "open":
            if self.clock() - self.opened_at < self.settings.cooldown:
                return  # a success during the cooldown does not cut it short
            self._move("half_open", "cooldown over")
        self.successes += 1
        if self.successes >= self.settings.healthy_threshold:
            self._move("closed", f"{self.successes} successful probe(s)")

    def record_failure(self, why: str) -> None:
        self.probed = True
        self.last_error = why
        self.successes = 0
        if self.state == "half_open":
            self._move("open", f"half-open probe failed: {why}")
            return
        if self.state == "open":
            return
        self.failures += 1
        if self.failures >= self.settings.unhealthy_threshold:
            self._move("open", f"{self.failures} consecutive failures, last: {why}")

    def _move(self, state: CircuitState, why: str) -> None:
        previous, self.state = self.state, state
        if state == "open":
            self.opened_at = self.clock()
        if state in ("closed", "open"):
            self.successes = 0
        if state == "closed":
            self.failures = 0
        self.transitions.append((previous, state, why))
        level = logging.WARNING if state == "open" else logging.INFO
        log.log(level, "backend %s circuit %s -> %s (%s)", self.name, previous, state, why)


async def probe(client: httpx.AsyncClient, timeout: float) -> str | None:
    """None when the backend's /health answers 200, else why not."""
    try:
        response = await client.get("/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if response.status_code == 200 else f"/health answered {response.status_code}"


class HealthMonitor:
    """Runs the active probes: one task per backend, each on its own interval."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, targets: list[tuple[Circuit, httpx.AsyncClient]]) -> None:
        for circuit, client in targets:
            self._tasks.append(asyncio.create_task(self._run(circuit, client), name=f"health:{circuit.name}"))

    async def _run(self, circuit: Circuit, client: httpx.AsyncClient) -> None:
        while True:
            if circuit.paused:
                await asyncio.sleep(circuit.settings.interval)
                continue
            problem = await probe(client, circuit.settings.timeout)
            if problem is None:
                circuit.record_success()
            else:
                circuit.record_failure(problem)
            # An open circuit is probed as soon as its cooldown ends.
            wait = circuit.settings.interval
            if circuit.state == "open":
                wait = min(wait, max(circuit.retry_after(), 0.05))
            await asyncio.sleep(wait)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
