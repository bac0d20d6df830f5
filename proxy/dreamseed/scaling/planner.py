"""Whether a start fits its host's GPU memory budget, and which idle backends to stop for it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..policy import Catalog, Scale, memory_plan
from .machine import BackendScaler


@dataclass(frozen=True)
class Plan:
    ok: bool
    evict: tuple[str, ...] = ()
    reason: str = ""


def plan_start(name: str, machines: Mapping[str, BackendScaler], catalog: Catalog,
               in_flight: Callable[[str], int], scale: Scale) -> Plan:
    """Whether starting `name` keeps each host it runs on (all its replicas start together) within
    its GPU memory budget, and which idle on-demand backends of lower priority must stop first.
    Never plans beyond capacity."""
    backend = catalog.backends[name]
    if backend.gpu_memory_utilization is None:
        return Plan(True)
    evict: list[str] = []
    for host in backend.hosts():
        plan = _plan_on_host(name, host, machines, catalog, in_flight, scale, evict)
        if not plan.ok:
            return plan
        evict += [n for n in plan.evict if n not in evict]
    return Plan(True, tuple(evict))


def _plan_on_host(name: str, host: str, machines: Mapping[str, BackendScaler], catalog: Catalog,
                  in_flight: Callable[[str], int], scale: Scale, evicting: list[str]) -> Plan:
    plan = memory_plan(catalog, host)

    def backend_of(label: str) -> str:
        return label.split("#")[0]  # a backend's replicas are planned as name#1, name#2...

    running = {n for n in plan.on_demand if backend_of(n) != name and backend_of(n) not in evicting
               and machines.get(backend_of(n)) is not None
               and machines[backend_of(n)].state in ("starting", "ready", "draining")}

    def footprint(n: str) -> float:
        return plan.backends[n].footprint_gib

    used = plan.always_on_gib + sum(footprint(n) for n in running)
    need = sum(footprint(n) for n in plan.backends if backend_of(n) == name)
    if used + need <= plan.budget_gib + 1e-9:
        return Plan(True)
    priority = scale.backends[name].priority
    candidates = sorted(
        (n for n in running if machines[backend_of(n)].state == "ready" and in_flight(backend_of(n)) == 0
         and scale.backends[backend_of(n)].priority < priority),
        key=lambda n: (scale.backends[backend_of(n)].priority, machines[backend_of(n)].last_activity()))
    evict: list[str] = []
    for candidate in candidates:
        evict.append(backend_of(candidate))
        used -= footprint(candidate)
        if used + need <= plan.budget_gib + 1e-9:
            return Plan(True, tuple(dict.fromkeys(evict)))
    busy = ", ".join(f"{n} ({footprint(n):.1f} GiB, {machines[backend_of(n)].state})" for n in sorted(running)) or "none"
    return Plan(False, reason=(
        f"GPU memory budget of {host}: {name} needs {need:.1f} GiB, "
        f"{max(plan.budget_gib - used, 0):.1f} GiB free after the always-on backends and the running "
        f"on-demand ones ({busy}); none of those is idle with a lower priority"))
