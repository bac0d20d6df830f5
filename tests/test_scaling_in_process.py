"""The on-demand state machine and its driver against a fake clock: no real sleeps in the
machine tests; the driver tests use fake actuators and a mock backend (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
import pytest

from dreamseed.health import Circuit
from dreamseed.policy import Catalog, HealthCheck, OnDemand, Scale
from dreamseed.scaling import BackendScaler, Scaler, Verdict, plan_start

T = 1800.0  # the seed's idle stop: 30 minutes


def settings(**overrides: Any) -> OnDemand:
    base: dict[str, Any] = {"actuator": {"kind": "command", "start": ["true"], "stop": ["true"]},
                            "triggers": {"keywords": True, "volume": {"requests": 10, "window": 600}},
                            "idle_stop": T, "min_uptime": 300, "cooldown": 60, "backoff": 30, "backoff_max": 240}
    base.update(overrides)
    return msgspec.convert(base, OnDemand)


def ready_at(machine: BackendScaler, now: float) -> None:
    assert machine.begin_start(now, "test")
    machine.start_succeeded(now)


def test_a_keyword_request_starts_a_stopped_backend_at_once() -> None:
    machine = BackendScaler("code", settings())
    verdict = machine.observe(0.0, keyword=True)
    assert verdict.start == "keyword" and verdict.action == "fallback" and verdict.reason == "starting"
    assert BackendScaler("code", settings(triggers={"keywords": False, "volume": None})).observe(
        0.0, keyword=True).start is None


def test_volume_starts_at_n_requests_in_the_window_and_not_at_n_minus_one() -> None:
    machine = BackendScaler("code", settings())
    for i in range(9):
        assert machine.observe(i * 60.0, keyword=False).start is None  # 9 requests in 10 minutes: no
    verdict = machine.observe(599.0, keyword=False)  # the 10th, within 600 s of the first
    assert verdict.start == "volume (10 requests in 600 s)"


def test_requests_spread_wider_than_the_window_do_not_start_it() -> None:
    machine = BackendScaler("code", settings())
    for i in range(30):
        assert machine.observe(i * 70.0, keyword=False).start is None  # 10 requests span 630 s > 600 s


def test_idle_stop_falls_due_at_exactly_t_and_not_before() -> None:
    machine = BackendScaler("code", settings())
    ready_at(machine, 0.0)
    machine.observe(1000.0, keyword=False)  # the last request
    assert machine.next_idle_stop() == 1000.0 + T
    assert not machine.idle_due(1000.0 + T - 0.001, in_flight=0)
    assert machine.idle_due(1000.0 + T, in_flight=0)
    assert not machine.idle_due(1000.0 + T, in_flight=1)  # a stream still running keeps it up


def test_min_uptime_and_cooldown_prevent_flapping() -> None:
    machine = BackendScaler("code", settings(idle_stop=10, min_uptime=300, cooldown=60))
    ready_at(machine, 0.0)
    assert not machine.idle_due(100.0, 0)  # idle for 100 s > 10 s, but up for less than min_uptime
    assert machine.idle_due(300.0, 0)
    assert machine.begin_stop(300.0, "idle")
    machine.stop_finished(305.0)
    assert machine.observe(364.9, keyword=True).reason == "cooldown"  # a trigger within the cooldown
    verdict = machine.observe(365.0, keyword=True)
    assert verdict.start == "keyword"


def test_failed_starts_back_off_exponentially_up_to_the_cap() -> None:
    machine = BackendScaler("code", settings(backoff=30, backoff_max=100))
    delays = []
    now = 0.0
    for _ in range(4):
        assert machine.begin_start(now, "keyword")
        machine.start_failed(now, "boom")
        delays.append(machine.next_attempt - now)
        assert machine.observe(machine.next_attempt - 0.1, keyword=True).reason == "backoff"
        now = machine.next_attempt
        assert machine.observe(now, keyword=True).start == "keyword"
    assert delays == [30, 60, 100, 100]
    machine.begin_start(now, "keyword")
    machine.start_succeeded(now + 5)
    assert machine.failures == 0 and machine.last_error is None


def test_wait_mode_holds_requests_up_to_max_waiting_then_diverts() -> None:
    machine = BackendScaler("code", settings(cold_start="wait", max_waiting=2, max_wait=60))
    assert machine.observe(0.0, keyword=True).action == "wait"
    machine.begin_start(0.0, "keyword")
    machine.waiting = 2
    assert machine.observe(1.0, keyword=True) == Verdict("fallback", "queue_full")


def test_transitions_follow_the_documented_states() -> None:
    machine = BackendScaler("code", settings())
    assert not machine.begin_stop(0.0, "idle")  # nothing to stop
    ready_at(machine, 0.0)
    assert not machine.begin_start(1.0, "again")  # coalesced: already up
    machine.begin_stop(2.0, "admin")
    assert machine.observe(2.5, keyword=True).reason == "draining"
    machine.stop_finished(3.0)
    assert [(a, b) for _, a, b, _ in machine.history] == [
        ("stopped", "starting"), ("starting", "ready"), ("ready", "draining"), ("draining", "stopped")]


# --- the GPU memory budget --------------------------------------------------------------------


def catalog(a_priority: int = 0) -> tuple[Catalog, Scale]:
    cat = msgspec.convert({
        "hosts": {"gpu": {"gpu_memory_gb": 32, "headroom": 0.05}},
        "backends": {
            "general": {"url": "http://127.0.0.1:1", "model": "g", "context_length": 1, "host": "gpu",
                        "gpu_memory_utilization": 0.3},
            "a": {"url": "http://127.0.0.1:2", "model": "a", "context_length": 1, "host": "gpu",
                  "gpu_memory_utilization": 0.4, "on_demand": True},
            "b": {"url": "http://127.0.0.1:3", "model": "b", "context_length": 1, "host": "gpu",
                  "gpu_memory_utilization": 0.4, "on_demand": True},
        }}, Catalog)
    scale = Scale(backends={"a": settings(priority=a_priority), "b": settings(priority=5)})
    return cat, scale


def test_a_start_that_fits_needs_no_eviction() -> None:
    cat, scale = catalog()
    machines = {name: BackendScaler(name, scale.backends[name]) for name in scale.backends}
    assert plan_start("b", machines, cat, lambda n: 0, scale).evict == ()


def test_an_idle_lower_priority_backend_is_evicted_to_make_room() -> None:
    cat, scale = catalog(a_priority=0)
    machines = {name: BackendScaler(name, scale.backends[name]) for name in scale.backends}
    ready_at(machines["a"], 0.0)  # 0.3 + 0.4 + 0.4 > 0.95: b does not fit beside a
    plan = plan_start("b", machines, cat, lambda n: 0, scale)
    assert plan.ok and plan.evict == ("a",)


def test_a_start_is_refused_with_the_reason_when_nothing_can_make_room() -> None:
    cat, scale = catalog(a_priority=10)  # a outranks b
    machines = {name: BackendScaler(name, scale.backends[name]) for name in scale.backends}
    ready_at(machines["a"], 0.0)
    plan = plan_start("b", machines, cat, lambda n: 0, scale)
    assert not plan.ok and plan.evict == ()
    assert "b needs 13.8 GiB, 6.0 GiB free" in plan.reason and "a (13.8 GiB, ready)" in plan.reason
    cat, scale = catalog(a_priority=0)
    machines = {name: BackendScaler(name, scale.backends[name]) for name in scale.backends}
    ready_at(machines["a"], 0.0)
    assert not plan_start("b", machines, cat, lambda n: 1, scale).ok  # a is busy: not evicted mid-request


# --- the driver, with fake actuators ------------------------------------------------------------


class FakeActuator:
    description = "fake"

    def __init__(self, backend: dict[str, bool], fail: bool = False, delay: float = 0.05) -> None:
        self.backend, self.fail, self.delay = backend, fail, delay
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")
        await asyncio.sleep(self.delay)
        if self.fail:
            from dreamseed.scaling import ActuatorError

            raise ActuatorError("no GPU")
        self.backend["up"] = True

    async def stop(self) -> None:
        self.calls.append("stop")
        self.backend["up"] = False

    async def running(self) -> bool:
        return self.backend["up"]

    async def aclose(self) -> None:
        pass


class FakeUpstream:
    def __init__(self, backend: dict[str, bool]) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200 if backend["up"] else 503, json={})

        self.client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://backend")
        self.transport = None
        self.circuit = Circuit("a", HealthCheck())


def driver(**overrides: Any) -> tuple[Scaler, FakeActuator, FakeUpstream]:
    cat, _ = catalog()
    scale = Scale(backends={"a": settings(**overrides)})
    backend = {"up": False}
    upstream = FakeUpstream(backend)
    scaler = Scaler(scale, cat, lambda name: [upstream])  # a backend of one replica
    actuator = FakeActuator(backend)
    scaler.actuators["a"] = actuator  # type: ignore[assignment]
    return scaler, actuator, upstream


def test_concurrent_triggers_coalesce_into_one_start_and_held_requests_go_through() -> None:
    async def scenario() -> None:
        scaler, actuator, upstream = driver(cold_start="wait", max_wait=5)
        verdicts = await asyncio.gather(*(scaler.admit("a", keyword=True) for _ in range(20)))
        assert actuator.calls == ["start"]
        assert all(verdict.action == "forward" and waited > 0 for verdict, waited in verdicts)
        assert scaler.machines["a"].state == "ready" and upstream.circuit.paused is False
        await scaler.aclose()

    asyncio.run(scenario())


def test_a_failed_start_diverts_held_requests_and_records_the_error() -> None:
    async def scenario() -> None:
        scaler, actuator, _ = driver(cold_start="wait", max_wait=5)
        actuator.fail = True
        verdict, _ = await scaler.admit("a", keyword=True)
        assert verdict.action == "fallback" and verdict.reason == "failed"
        assert scaler.machines["a"].last_error == "no GPU"
        assert scaler.status("a")["state"] == "failed"
        await scaler.aclose()

    asyncio.run(scenario())


def test_an_admin_stop_drains_and_stops_through_the_actuator() -> None:
    async def scenario() -> None:
        scaler, actuator, upstream = driver()
        assert scaler.admin_start("a") == (True, "starting")
        while scaler.machines["a"].state != "ready":
            await asyncio.sleep(0.01)
        assert scaler.admin_stop("a") == (True, "draining")
        while scaler.machines["a"].state != "stopped":
            await asyncio.sleep(0.01)
        assert actuator.calls == ["start", "stop"] and upstream.circuit.paused is True
        await scaler.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", [
    "backends:\n  general:\n    actuator: {kind: command, start: [x], stop: [y]}\n",
    "backends:\n  code:\n    actuator: {kind: shell, start: 'rm -rf /'}\n",
])
def test_scale_policy_mistakes_are_reported(tmp_path: Any, bad: str) -> None:
    import shutil

    from dreamseed.policy import PolicyError, load_policies
    from support import SEED_POLICIES

    shutil.copytree(SEED_POLICIES, tmp_path / "p")
    (tmp_path / "p" / "scale.yaml").write_text(bad, encoding="utf-8")
    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path / "p")
    text = str(caught.value)
    assert "scale.yaml:" in text
    assert ("is not `on_demand: true`" in text) or ("Invalid value 'shell'" in text), text


def two_backend_driver(a_priority: int) -> tuple[Scaler, dict[str, FakeActuator]]:
    cat, scale = catalog(a_priority=a_priority)
    scale = Scale(backends={"a": settings(priority=a_priority, cold_start="wait", max_wait=5),
                            "b": settings(priority=5, cold_start="wait", max_wait=5)})
    states = {"a": {"up": False}, "b": {"up": False}}
    upstreams = {name: FakeUpstream(state) for name, state in states.items()}
    scaler = Scaler(scale, cat, lambda name: [upstreams[name]])  # a backend of one replica
    actuators = {name: FakeActuator(state) for name, state in states.items()}
    scaler.actuators.update(actuators)  # type: ignore[arg-type]
    return scaler, actuators


def test_the_driver_evicts_an_idle_lower_priority_backend_before_starting() -> None:
    async def scenario() -> None:
        scaler, actuators = two_backend_driver(a_priority=0)
        assert (await scaler.admit("a", keyword=True))[0].action == "forward"
        verdict, _ = await scaler.admit("b", keyword=True)
        assert verdict.action == "forward"
        assert actuators["a"].calls == ["start", "stop"] and actuators["b"].calls == ["start"]
        assert scaler.machines["a"].state == "stopped" and scaler.machines["a"].last_reason == "budget: making room for b"
        await scaler.aclose()

    asyncio.run(scenario())


def test_the_driver_refuses_a_start_beyond_the_budget_at_once_with_the_reason() -> None:
    async def scenario() -> None:
        scaler, actuators = two_backend_driver(a_priority=10)
        assert (await scaler.admit("a", keyword=True))[0].action == "forward"
        verdict, waited = await scaler.admit("b", keyword=True)
        assert verdict == Verdict("fallback", "refused") and waited == 0.0  # not held for max_wait
        assert actuators["b"].calls == [] and actuators["a"].calls == ["start"]
        assert "GPU memory budget" in scaler.status("b")["last_error"]
        assert scaler.machines["a"].state == "ready" and scaler.machines["b"].state == "stopped"
        await scaler.aclose()

    asyncio.run(scenario())


def test_the_transition_history_is_bounded() -> None:
    from dreamseed.scaling.machine import HISTORY

    machine = BackendScaler("code", settings())
    for day in range(200):  # started and stopped daily for 200 days
        now = day * 86400.0
        ready_at(machine, now)
        machine.begin_stop(now + 1, "admin")
        machine.stop_finished(now + 2)
    assert len(machine.history) == HISTORY
    assert machine.history[-1][2] == "stopped" and machine.history[-1][0] == 199 * 86400.0 + 2


def test_the_host_coordinator_excludes_across_processes_and_shares_last_use(tmp_path: Any) -> None:
    """What `serve --workers N` without a database uses: two coordinators stand for two workers
    (a file lock conflicts between two open files even in one process, as between processes)."""
    from dreamseed.scaling import HostCoordinator

    first, second = HostCoordinator(tmp_path), HostCoordinator(tmp_path)

    async def scenario() -> None:
        assert await first.seconds_since_use("code") is None
        order: list[str] = []

        async def hold(coordinator: HostCoordinator, name: str) -> None:
            async with coordinator.lock("code"):
                order.append(f"{name} in")
                await asyncio.sleep(0.2)
                order.append(f"{name} out")

        await asyncio.gather(hold(first, "first"), hold(second, "second"))
        assert order in (["first in", "first out", "second in", "second out"],
                         ["second in", "second out", "first in", "first out"])
        async with first.lock("code"), second.lock("general"):  # one lock per backend
            pass
        await second.touch("code")
        since = await first.seconds_since_use("code")
        assert since is not None and since < 1.0

    asyncio.run(scenario())
