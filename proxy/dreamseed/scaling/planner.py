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
    """Whether starting `name` keeps its host within its GPU memory budget, and which idle
    on-demand backends of lower priority must stop first. Never plans beyond capacity."""
    backend = catalog.backends[name]
    if backend.host is None or backend.gpu_memory_utilization is None:
        return Plan(True)
    plan = memory_plan(catalog, backend.host)
    running = {n for n in plan.on_demand if n != name and machines.get(n) is not None
               and machines[n].state in ("starting", "ready", "draining")}

    def footprint(n: str) -> float:
        return plan.backends[n].footprint_gib

    used = plan.always_on_gib + sum(footprint(n) for n in running)
    need = footprint(name)
    if used + need <= plan.budget_gib + 1e-9:
        return Plan(True)
    priority = scale.backends[name].priority
    candidates = sorted(
        (n for n in running if machines[n].state == "ready" and in_flight(n) == 0
         and scale.backends[n].priority < priority),
        key=lambda n: (scale.backends[n].priority, machines[n].last_activity()))
    evict: list[str] = []
    for candidate in candidates:
        evict.append(candidate)
        used -= footprint(candidate)
        if used + need <= plan.budget_gib + 1e-9:
            return Plan(True, tuple(evict))
    busy = ", ".join(f"{n} ({footprint(n):.1f} GiB, {machines[n].state})" for n in sorted(running)) or "none"
    return Plan(False, reason=(
        f"GPU memory budget of {backend.host}: {name} needs {need:.1f} GiB, "
        f"{max(plan.budget_gib - used, 0):.1f} GiB free after the always-on backends and the running "
        f"on-demand ones ({busy}); none of those is idle with a lower priority"))


