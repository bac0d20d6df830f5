"""GPU capacity planning: how the backends on one host share its memory."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Catalog, GpuHost


def gpu_budget(host: GpuHost) -> float:
    """Share of a host's GPU memory that backends may claim, after headroom."""
    return 1.0 - host.headroom


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What one GPU host must hold: its always-on backends plus, at worst, its largest
    on-demand one (the scaler never runs more than fits). Shares are fractions of the
    host's GPU memory, as vLLM's --gpu-memory-utilization takes them."""

    host_name: str
    host: GpuHost
    always_on: dict[str, float]
    on_demand: dict[str, float]

    @property
    def budget(self) -> float:
        return gpu_budget(self.host)

    @property
    def always_on_share(self) -> float:
        return sum(self.always_on.values())

    @property
    def worst_case_share(self) -> float:
        return self.always_on_share + max(self.on_demand.values(), default=0.0)

    def gigabytes(self, share: float) -> float:
        return share * self.host.gpu_memory_gb

    def problems(self) -> list[tuple[str | None, str]]:
        """(backend or None for the host, message) for each way the plan does not fit."""
        host, budget, always = self.host_name, self.budget, self.always_on_share
        if always > budget + 1e-9:
            return [(None, f"always-on backends claim {always:.2f} of the GPU memory "
                           f"({self.gigabytes(always):.1f} GB of {self.host.gpu_memory_gb:g} GB), "
                           f"more than the {budget:.2f} left after {self.host.headroom:.0%} headroom")]
        return [
            (name, f"on-demand backend can never start: {share:.2f} on top of the always-on "
                   f"{always:.2f} exceeds {host}'s budget of {budget:.2f}")
            for name, share in self.on_demand.items()
            if always + share > budget + 1e-9
        ]


def memory_plan(catalog: Catalog, host_name: str) -> MemoryPlan:
    members = {n: b for n, b in catalog.backends.items() if b.host == host_name and b.gpu_memory_utilization}
    return MemoryPlan(
        host_name=host_name,
        host=catalog.hosts[host_name],
        always_on={n: b.gpu_memory_utilization or 0.0 for n, b in members.items() if not b.on_demand},
        on_demand={n: b.gpu_memory_utilization or 0.0 for n, b in members.items() if b.on_demand},
    )


