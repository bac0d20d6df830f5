"""The circuit breaker's state machine, on a fake clock (no sleeping)."""

from __future__ import annotations

from dreamseed.health import Circuit
from dreamseed.policy import HealthCheck


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def circuit(**settings: float) -> tuple[Circuit, Clock]:
    clock = Clock()
    return Circuit("b", HealthCheck(**settings), clock=clock), clock  # type: ignore[arg-type]


def test_opens_after_the_threshold_of_consecutive_failures_only() -> None:
    c, _ = circuit(unhealthy_threshold=3)
    c.record_failure("x")
    c.record_failure("x")
    c.record_success()  # a success in between resets the count
    c.record_failure("x")
    c.record_failure("x")
    assert c.state == "closed" and c.allows_requests()
    c.record_failure("refused")
    assert c.state == "open" and not c.allows_requests()
    assert c.last_error == "refused"


def test_cooldown_then_half_open_probe_decides() -> None:
    c, clock = circuit(unhealthy_threshold=1, cooldown=10, healthy_threshold=2)
    c.record_failure("down")
    clock.now += 9.9
    assert not c.allows_requests() and c.state == "open"
    assert abs(c.retry_after() - 0.1) < 1e-6
    c.record_success()  # a success before the cooldown ends does not cut it short
    assert c.state == "open"
    clock.now += 0.1
    assert not c.allows_requests() and c.state == "half_open"  # still skipped until a probe closes it
    c.record_success()
    assert c.state == "half_open"  # healthy_threshold is 2
    c.record_success()
    assert c.state == "closed" and c.allows_requests()


def test_a_failed_half_open_probe_reopens_for_a_full_cooldown() -> None:
    c, clock = circuit(unhealthy_threshold=1, cooldown=5)
    c.record_failure("down")
    clock.now += 5
    assert not c.allows_requests() and c.state == "half_open"
    c.record_failure("still down")
    assert c.state == "open" and c.opened_at == clock.now
    clock.now += 4.9
    assert c.state == "open" and not c.allows_requests()
    assert [t[:2] for t in c.transitions] == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]


def test_a_flapping_backend_keeps_a_bounded_history() -> None:
    from dreamseed.health import HISTORY

    c, clock = circuit(unhealthy_threshold=1, cooldown=1)
    for _ in range(500):
        c.record_failure("down")
        clock.now += 1
        c.allows_requests()  # half-open
        c.record_success()
    assert len(c.transitions) == HISTORY and c.transitions[-1][1] == "closed"
