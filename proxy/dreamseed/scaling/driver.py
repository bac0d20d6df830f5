"""The async driver of the on-demand state machines: runs actuators, polls readiness, holds or
diverts requests while a backend starts (`cold_start: wait | fallback`), stops idle backends,
keeps each host's GPU memory budget (evicting idle lower-priority backends first, or refusing
with the reason), and coordinates proxy processes through a Coordinator."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import ProxyError
from ..exchange import Exchange
from ..policy import Catalog, Scale
from ..routing import Decision
from .actuators import Actuator, ActuatorError, is_ready, make_actuator
from .coordination import Coordinator, LocalCoordinator
from .machine import BackendScaler, Verdict
from .planner import plan_start

log = logging.getLogger("dreamseed.scaling")

TICK_S = 1.0
READY_POLL_S = 0.5
ACTIVITY_WRITE_S = 5.0
DISCOVER_S = 5.0  # how often a process tells the others it used a backend


class Scaler:
    def __init__(self, scale: Scale, catalog: Catalog, upstream_of: Callable[[str], Any],
                 coordinator: Coordinator | None = None, on_event: Callable[[str, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scale = scale
        self.catalog = catalog
        self.upstream_of = upstream_of  # the current generation's ReplicaSet for a backend name
        self.coordinator = coordinator or LocalCoordinator()
        self.on_event = on_event or (lambda backend, event, reason: None)
        self.clock = clock
        self.machines = {name: BackendScaler(name, settings) for name, settings in scale.backends.items()}
        self.actuators: dict[str, Actuator] = {name: make_actuator(settings.actuator)
                                               for name, settings in scale.backends.items()}
        self._ready: dict[str, asyncio.Event] = {name: asyncio.Event() for name in scale.backends}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._touched: dict[str, float] = {}

    def manages(self, name: str) -> bool:
        return name in self.machines

    async def prune_chain(self, decision: Decision, headers: dict[str, str], exchange: Exchange) -> Decision:
        """The routing decision with the on-demand backends that cannot take a request now left
        out. For the target: forward when ready; otherwise hold the request while its start runs
        (`wait`) or skip to the fallback (`fallback`), saying which in the headers. Fallbacks
        that are on-demand are used only when ready (they are not started for a fallback)."""
        kept: list[str] = []
        refused: str | None = None
        for position, name in enumerate(decision.chain):
            if not self.manages(name):
                kept.append(name)
                continue
            if position == 0:
                verdict, waited = await self.admit(name, keyword=decision.keyword)
                if verdict.action == "forward":
                    if waited:
                        headers["x-dreamseed-cold-start"] = f"waited {waited:.2f}s"
                    kept.append(name)
                    continue
                headers["x-dreamseed-cold-start"] = "fallback"
                exchange.fallbacks.append(f"{name}:{verdict.reason}")
                refused = refused or self.machines[name].last_error
            elif self.machines[name].state == "ready":
                kept.append(name)
            else:
                exchange.fallbacks.append(f"{name}:{self.machines[name].state}")
        if not kept:
            skipped = ", ".join(exchange.fallbacks)
            why = f"no backend can take the request now ({skipped})" + (f": {refused}" if refused else "")
            raise ProxyError("backend_not_running", why,
                             headers={**headers, "x-dreamseed-fallback": skipped, "retry-after": "10"})
        if len(kept) == len(decision.chain):
            return decision
        return Decision(decision.rule, tuple(kept), decision.reason, decision.keyword)

    def in_flight(self, name: str) -> int:
        replicas = self.upstream_of(name) or []
        return sum(r.transport.in_use + r.transport.waiting for r in replicas if r.transport is not None)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_health(self, name: str, up: bool) -> None:
        """Health probes of a backend we stopped would only open its circuits: pause them."""
        for circuit in self._circuits(name):
            circuit.paused = not up
            if up:
                circuit.reset("started by the scaler")

    def _circuits(self, name: str) -> list[Any]:
        replicas = self.upstream_of(name)
        return [r.circuit for r in replicas if r.circuit is not None] if replicas is not None else []

    def _clients(self, name: str) -> list[Any] | None:
        """Each replica's probe client; None when a replica has no URL configured."""
        replicas = self.upstream_of(name)
        clients = [r.client for r in replicas] if replicas is not None else [None]
        return None if any(client is None for client in clients) else clients

    async def _all_ready(self, clients: list[Any]) -> bool:
        """Every replica answers: an on-demand backend's replicas start and stop together."""
        return all(await asyncio.gather(*(is_ready(client) for client in clients)))

    async def start(self) -> None:
        for name in self.machines:
            self._set_health(name, False)
        # Before serving: which on-demand backends already run (bounded, so a hung Docker socket
        # cannot hold up the start; they are then found by their first start instead).
        try:
            await asyncio.wait_for(asyncio.gather(*(self._discover(name) for name in self.machines)), DISCOVER_S)
        except TimeoutError:
            log.warning("finding out which on-demand backends run took longer than %g s", DISCOVER_S)
        self._spawn(self._tick())

    async def _discover(self, name: str) -> None:
        """At start-up a backend may already run (another proxy process started it)."""
        try:
            running = await self.actuators[name].running()
        except ActuatorError as exc:
            log.warning("cannot ask %s whether %s runs (%s); probing the backend itself", self.actuators[name].description,
                        name, exc)
            running = None
        clients = self._clients(name)
        if running is not False and clients is not None and await self._all_ready(clients):
            if self.machines[name].state == "stopped":
                self.machines[name].found_running(self.clock())
                self._set_health(name, True)
                self._ready[name].set()

    # --- the request path ------------------------------------------------------------

    async def admit(self, name: str, *, keyword: bool) -> tuple[Verdict, float]:
        """Decide for one request whose target is `name`; returns the verdict and, for a held
        request, how long it waited. A held request comes back as `forward` once ready."""
        machine = self.machines[name]
        now = self.clock()
        verdict = machine.observe(now, keyword=keyword)
        if now - self._touched.get(name, -1e9) >= ACTIVITY_WRITE_S:  # tell other proxy processes, now and then
            self._touched[name] = now
            self._spawn(self.coordinator.touch(name))
        if verdict.start and not self.request_start(name, verdict.start) and machine.state in ("stopped", "failed"):
            return Verdict("fallback", "refused"), 0.0  # the GPU budget said no: machine.last_error says why
        if verdict.action != "wait":
            return verdict, 0.0
        machine.waiting += 1
        try:
            await asyncio.wait_for(self._ready[name].wait(), self.machines[name].settings.max_wait)
        except TimeoutError:
            return Verdict("fallback", "start_timeout" if machine.state == "starting" else machine.state), \
                self.clock() - now
        finally:
            machine.waiting -= 1
        if machine.state != "ready":
            return Verdict("fallback", machine.state), self.clock() - now
        return Verdict("forward"), self.clock() - now

    # --- starting ----------------------------------------------------------------------

    def request_start(self, name: str, reason: str) -> bool:
        """Begin a start unless one runs (concurrent triggers coalesce into one)."""
        machine = self.machines[name]
        if name in self._busy or machine.state in ("starting", "ready", "draining"):
            return False
        plan = plan_start(name, self.machines, self.catalog, self.in_flight, self.scale)
        if not plan.ok:
            machine.last_error = plan.reason
            log.warning("start of %s refused (%s): %s", name, reason, plan.reason)
            self.on_event(name, "refused", "budget")
            return False
        machine.begin_start(self.clock(), reason)
        self._ready[name].clear()
        self.on_event(name, "start", reason.split(" ")[0])
        self._busy[name] = self._spawn(self._run_start(name, reason, plan.evict))
        return True

    async def _run_start(self, name: str, reason: str, evict: tuple[str, ...]) -> None:
        machine = self.machines[name]
        try:
            for other in evict:
                log.info("stopping %s to free GPU memory for %s", other, name)
                why = f"budget: making room for {name}"
                if self._begin_stop(other, why):
                    await self._finish_stop(other, why, force=True)
                if self.machines[other].state != "stopped":
                    raise ActuatorError(f"could not free GPU memory: {other} did not stop")
            clients = self._clients(name)
            if clients is None:
                raise ActuatorError(f"backend {name} has no URL configured")
            async with self.coordinator.lock(name):
                if not await self._all_ready(clients):
                    running = await self.actuators[name].running()
                    if not running:
                        log.info("starting %s via %s (%s)", name, self.actuators[name].description, reason)
                        await self.actuators[name].start()
                    deadline = self.clock() + machine.settings.start_timeout
                    while not await self._all_ready(clients):
                        if self.clock() >= deadline:
                            raise ActuatorError(f"not ready within start_timeout ({machine.settings.start_timeout:g} s)")
                        await asyncio.sleep(READY_POLL_S)
            machine.start_succeeded(self.clock())
            self._set_health(name, True)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong (actuator, database), the start failed
            error = str(exc) if isinstance(exc, ActuatorError) else f"{type(exc).__name__}: {exc}"
            machine.start_failed(self.clock(), error)
            self.on_event(name, "start_failed", "error")
            log.error("start of %s failed: %s", name, error)
        finally:
            self._ready[name].set()  # waiters look at the state: ready, or fall back
            self._busy.pop(name, None)

    # --- stopping ------------------------------------------------------------------------

    def request_stop(self, name: str, reason: str, *, force: bool = False) -> bool:
        """Ready -> draining now (new requests go elsewhere at once); the stop itself runs after."""
        if name in self._busy or not self._begin_stop(name, reason):
            return False
        self._busy[name] = self._spawn(self._stop_task(name, reason, force))
        return True

    def _begin_stop(self, name: str, reason: str) -> bool:
        if not self.machines[name].begin_stop(self.clock(), reason):
            return False
        self._ready[name].clear()
        self.on_event(name, "stop", reason.split(":")[0].split(" ")[0])
        return True

    async def _stop_task(self, name: str, reason: str, force: bool) -> None:
        try:
            await self._finish_stop(name, reason, force=force)
        finally:
            self._busy.pop(name, None)

    async def _finish_stop(self, name: str, reason: str, *, force: bool) -> None:
        """Drain in-flight requests (up to drain_timeout), then stop through the actuator."""
        machine = self.machines[name]
        deadline = self.clock() + machine.settings.drain_timeout
        while self.in_flight(name) and self.clock() < deadline:
            await asyncio.sleep(0.1)  # in-flight requests (streams) finish first
        try:
            async with self.coordinator.lock(name):
                if not force and reason == "idle":
                    since = await self.coordinator.seconds_since_use(name)
                    if since is not None and since < machine.settings.idle_stop:
                        machine.stop_aborted(self.clock(), f"used by another proxy process {since:.0f} s ago")
                        self._ready[name].set()
                        return
                self._set_health(name, False)
                if await self.actuators[name].running() is False:
                    machine.stop_finished(self.clock(), f"{reason}; already stopped (by another proxy process?)")
                    return
                await self.actuators[name].stop()
        except Exception as exc:  # noqa: BLE001 - a failed stop leaves it running, and says so
            log.error("stop of %s failed: %s", name, exc)
            machine.last_error = f"stop failed: {exc}"
            machine.stop_aborted(self.clock(), f"stop failed: {exc}")
            self._set_health(name, True)
            self._ready[name].set()
            return
        machine.stop_finished(self.clock(), reason)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self.clock()
            for name, machine in self.machines.items():
                if machine.idle_due(now, self.in_flight(name)):
                    self.request_stop(name, "idle")
                elif machine.state == "ready" and name not in self._busy and self._circuit_open(name):
                    self._busy[name] = self._spawn(self._check_exited(name))

    def _circuit_open(self, name: str) -> bool:
        return any(circuit.state == "open" for circuit in self._circuits(name))

    async def _check_exited(self, name: str) -> None:
        """A ready backend whose health checks fail: if its process or container is gone (vLLM
        ran out of memory, say), it is stopped, and the next trigger starts it again."""
        try:
            running = await self.actuators[name].running()
        except ActuatorError:
            running = None
        finally:
            self._busy.pop(name, None)
        machine = self.machines[name]
        if running is False and machine.state == "ready":
            machine.last_error = "exited on its own while ready"
            machine.stop_finished(self.clock(), "exited on its own")
            machine.stopped_at = None  # not our stop: no cooldown before the next start
            self._set_health(name, False)
            self._ready[name].clear()
            self.on_event(name, "exited", "crash")

    # --- admin ------------------------------------------------------------------------------

    def admin_start(self, name: str) -> tuple[bool, str]:
        machine = self.machines[name]
        if machine.state in ("starting", "ready"):
            return True, f"already {machine.state}"
        if machine.state == "draining":
            return False, "it is draining; start it again once stopped"
        return (True, "starting") if self.request_start(name, "admin") else (False, machine.last_error or "refused")

    def admin_stop(self, name: str) -> tuple[bool, str]:
        machine = self.machines[name]
        if machine.state in ("stopped", "failed", "draining"):
            return True, f"already {machine.state}"
        if machine.state == "starting":
            return False, "it is starting; stop it once ready"
        return (True, "draining") if self.request_stop(name, "admin", force=True) else (False, "busy")

    def status(self, name: str) -> dict[str, Any]:
        machine = self.machines[name]
        now, wall = self.clock(), time.time()
        due = machine.next_idle_stop()
        return {"state": machine.state, "since": round(wall - (now - machine.since), 3) if machine.since else None,
                "reason": machine.last_reason, "last_error": machine.last_error, "waiting": machine.waiting,
                "next_idle_stop": round(wall + (due - now), 3) if due is not None else None,
                "cold_start": machine.settings.cold_start, "actuator": self.actuators[name].description}

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for actuator in self.actuators.values():
            await actuator.aclose()
        await self.coordinator.aclose()
