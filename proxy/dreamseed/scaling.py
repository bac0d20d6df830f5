"""On-demand backends: started when traffic calls for them, stopped when idle.

Two layers:

* :class:`BackendScaler` is the state machine of one backend, pure and driven by an explicit
  clock (`now` arguments), so tests step through hours without sleeping:

      stopped --trigger--> starting --ready--> ready --idle/admin--> draining --> stopped
                              |                                                    ^
                              +--start failed--> failed (exponential backoff) -----+

  Triggers: a request routed here by a keyword rule (`triggers.keywords`), or the volume of
  requests that would have gone here (`triggers.volume`: N within a sliding window). No
  flapping: `min_uptime` before an idle stop, `cooldown` before a start after a stop.

* :class:`Scaler` drives the machines: runs actuators, polls readiness, holds or diverts
  requests while a backend starts (`cold_start: wait | fallback`), stops idle backends,
  keeps the GPU memory budget of each host (evicting idle lower-priority backends first, or
  refusing with the reason), and coordinates proxy processes that share a database through
  Postgres advisory locks and a shared last-activity table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .actuators import ActuatorError, is_ready, make_actuator
from .policy import Catalog, OnDemand, Scale, memory_plan

log = logging.getLogger("dreamseed.scaling")

State = Literal["stopped", "starting", "ready", "draining", "failed"]
STATES: tuple[State, ...] = ("stopped", "starting", "ready", "draining", "failed")
TICK_S = 1.0
READY_POLL_S = 0.5
ACTIVITY_WRITE_S = 5.0
DISCOVER_S = 5.0  # how often a process tells the others it used a backend


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
    state: State = "stopped"
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
    history: list[tuple[float, State, State, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        volume = self.settings.triggers.volume
        self.recent = deque(maxlen=volume.requests if volume else 1)

    def _move(self, now: float, state: State, reason: str) -> None:
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


@dataclass(frozen=True)
class Plan:
    ok: bool
    evict: tuple[str, ...] = ()
    reason: str = ""


def plan_start(name: str, machines: Mapping[str, BackendScaler], catalog: Catalog,
               in_flight: Callable[[str], int], scale: Scale) -> Plan:
    """Whether starting `name` keeps its host within its GPU memory budget, and which idle
    on-demand backends of lower priority must stop first. Never plans beyond capacity."""
    backend = catalog.backends[name]
    if backend.host is None or backend.gpu_memory_utilization is None:
        return Plan(True)
    plan = memory_plan(catalog, backend.host)
    on_host = {n for n, b in catalog.backends.items() if b.host == backend.host and b.on_demand}
    running = {n for n in on_host if n != name and machines.get(n) is not None
               and machines[n].state in ("starting", "ready", "draining")}

    def share(n: str) -> float:
        return catalog.backends[n].gpu_memory_utilization or 0.0

    used = plan.always_on_share + sum(share(n) for n in running)
    need = share(name)
    if used + need <= plan.budget + 1e-9:
        return Plan(True)
    priority = scale.backends[name].priority
    candidates = sorted(
        (n for n in running if machines[n].state == "ready" and in_flight(n) == 0
         and scale.backends[n].priority < priority),
        key=lambda n: (scale.backends[n].priority, machines[n].last_activity()))
    evict: list[str] = []
    for candidate in candidates:
        evict.append(candidate)
        used -= share(candidate)
        if used + need <= plan.budget + 1e-9:
            return Plan(True, tuple(evict))
    busy = ", ".join(f"{n} ({plan.gigabytes(share(n)):.1f} GB, {machines[n].state})" for n in sorted(running)) or "none"
    return Plan(False, reason=(
        f"GPU memory budget of {backend.host}: {name} needs {plan.gigabytes(need):.1f} GB, "
        f"{plan.gigabytes(max(plan.budget - used, 0)):.1f} GB free after the always-on backends and the running "
        f"on-demand ones ({busy}); none of those is idle with a lower priority"))


class Coordinator(Protocol):
    """Mutual exclusion of starts and stops across proxy processes, and shared last use."""

    def lock(self, name: str) -> AbstractAsyncContextManager[Any]: ...

    async def touch(self, name: str) -> None: ...

    async def seconds_since_use(self, name: str) -> float | None: ...

    async def aclose(self) -> None: ...


class LocalCoordinator:
    """One proxy process: an asyncio lock per backend, no shared activity."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def touch(self, name: str) -> None:
        pass

    async def seconds_since_use(self, name: str) -> float | None:
        return None

    async def aclose(self) -> None:
        pass


class _ClusterLock:
    """This process's lock for the backend, then Postgres's session-level advisory lock: one
    proxy process at a time starts or stops it. The advisory lock is held for the whole start or
    stop and goes with the connection if this process dies."""

    def __init__(self, coordinator: PostgresCoordinator, name: str) -> None:
        self.coordinator = coordinator
        self.local = coordinator.local.lock(name)
        self.key = f"dreamseed-scale:{name}"
        self.conn: Any = None

    async def __aenter__(self) -> None:
        import psycopg

        await self.local.acquire()
        try:
            await self.coordinator.ensure_schema()
            self.conn = await psycopg.AsyncConnection.connect(self.coordinator.url, autocommit=True, connect_timeout=5)
            await self.conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.key,))
        except BaseException:
            if self.conn is not None:
                await self.conn.close()
            self.local.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.key,))
        finally:
            await self.conn.close()
            self.local.release()


class PostgresCoordinator:
    """Proxy processes sharing a database: only one starts or stops a backend at a time (the
    next one finds it running, or stopped), and idle stops honour every process's traffic."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = LocalCoordinator()
        self._ready = False

    async def ensure_schema(self) -> None:
        if self._ready:
            return
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.url, connect_timeout=5) as conn, conn.transaction():
            # Two processes creating the table at once would collide in the catalog: serialise them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dreamseed-scale-schema'))")
            await conn.execute("CREATE TABLE IF NOT EXISTS dreamseed_backend_activity ("
                               " backend text PRIMARY KEY, last_request timestamptz NOT NULL)")
        self._ready = True

    async def aclose(self) -> None:
        pass  # every query above opens and closes its own connection

    def lock(self, name: str) -> _ClusterLock:
        return _ClusterLock(self, name)

    async def touch(self, name: str) -> None:
        import psycopg

        try:
            await self.ensure_schema()
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(
                    "INSERT INTO dreamseed_backend_activity VALUES (%s, now()) ON CONFLICT (backend)"
                    " DO UPDATE SET last_request = greatest(dreamseed_backend_activity.last_request, now())", (name,))
        except Exception as exc:  # noqa: BLE001 - activity sharing is best effort
            log.warning("could not record activity of %s in the database: %s", name, exc)

    async def seconds_since_use(self, name: str) -> float | None:
        import psycopg

        await self.ensure_schema()
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            row = await (await conn.execute(
                "SELECT extract(epoch FROM now() - last_request) FROM dreamseed_backend_activity WHERE backend = %s",
                (name,))).fetchone()
        return float(row[0]) if row else None


class Scaler:
    def __init__(self, scale: Scale, catalog: Catalog, upstream_of: Callable[[str], Any],
                 coordinator: Coordinator | None = None, on_event: Callable[[str, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scale = scale
        self.catalog = catalog
        self.upstream_of = upstream_of  # the current generation's Upstream for a backend name
        self.coordinator = coordinator or LocalCoordinator()
        self.on_event = on_event or (lambda backend, event, reason: None)
        self.clock = clock
        self.machines = {name: BackendScaler(name, settings) for name, settings in scale.backends.items()}
        self.actuators = {name: make_actuator(settings.actuator) for name, settings in scale.backends.items()}
        self._ready: dict[str, asyncio.Event] = {name: asyncio.Event() for name in scale.backends}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._touched: dict[str, float] = {}

    def manages(self, name: str) -> bool:
        return name in self.machines

    def in_flight(self, name: str) -> int:
        upstream = self.upstream_of(name)
        transport = getattr(upstream, "transport", None)
        return (transport.in_use + transport.waiting) if transport is not None else 0

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_health(self, name: str, up: bool) -> None:
        """Health probes of a backend we stopped would only open its circuit: pause them."""
        circuit = getattr(self.upstream_of(name), "circuit", None)
        if circuit is not None:
            circuit.paused = not up
            if up:
                circuit.reset("started by the scaler")

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
        client = getattr(self.upstream_of(name), "client", None)
        if running is not False and client is not None and await is_ready(client):
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
            client = getattr(self.upstream_of(name), "client", None)
            if client is None:
                raise ActuatorError(f"backend {name} has no URL configured")
            async with self.coordinator.lock(name):
                if not await is_ready(client):
                    running = await self.actuators[name].running()
                    if not running:
                        log.info("starting %s via %s (%s)", name, self.actuators[name].description, reason)
                        await self.actuators[name].start()
                    deadline = self.clock() + machine.settings.start_timeout
                    while not await is_ready(client):
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
        circuit = getattr(self.upstream_of(name), "circuit", None)
        return circuit is not None and circuit.state == "open"

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
