"""GPU memory planning: what each vLLM process on a host really takes, and whether it all fits.

The model follows what vLLM does on one GPU (figures per GPU, in GiB):

- ``--gpu-memory-utilization`` is the share of the GPU's TOTAL memory one process may use for its
  weights, the activations of its profiling forward pass and its KV cache; vLLM refuses to start
  when less than that is free.
- Outside the share, each process holds its CUDA context and CUDA graphs
  (``hosts.*.process_overhead_gib``, about 1 GiB).
- ``--quantization fp8`` on a 16-bit checkpoint quantizes while loading: the 16-bit weights are on
  the GPU first, so the load peaks at the stored size. A pre-quantized checkpoint loads at its size.
- The KV cache must hold ``max_concurrency`` sequences of ``context_length`` tokens: the proxy
  admits that many requests at once, and a smaller cache makes vLLM preempt requests it accepted.
- Tensor parallelism splits weights and KV cache evenly over the GPUs; each GPU has the same share.

Backends placed on a host without a ``memory`` entry are planned by their share alone (and the
per-process overhead); the local stack requires ``memory`` for every server it deploys.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Backend, Catalog, GpuHost

GIB_IN_KIB = 1024 * 1024
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
# vLLM --quantization methods that quantize 16-bit weights while loading them, and to how many bits.
LOAD_TIME_QUANTIZATION = {"fp8": 8, "bitsandbytes": 4}
_EPSILON = 1e-9


def arg_value(args: list[str] | tuple[str, ...], flag: str) -> str | None:
    """The value of a command-line flag given as `--flag value` or `--flag=value`."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@dataclass(frozen=True, slots=True)
class BackendMemory:
    """One vLLM process on one GPU of its host. Sizes in GiB per GPU; tokens for the whole process."""

    name: str
    on_demand: bool
    share: float  # --gpu-memory-utilization
    gpu_gib: float  # one GPU of the host
    overhead_gib: float
    declared: bool = False  # whether the catalog gives `memory` (else only share and overhead are known)
    weights_gib: float = 0.0  # as it runs
    load_peak_gib: float = 0.0  # while loading (16-bit weights before a load-time quantization)
    load_time_quantization: str | None = None
    activations_gib: float = 0.0
    kv_kib_per_token: float = 0.0  # per GPU, at the KV cache's dtype
    kv_cache_fp8: bool = False
    kv_tokens_needed: int = 0  # context_length x max_concurrency

    @property
    def share_gib(self) -> float:
        return self.share * self.gpu_gib

    @property
    def footprint_gib(self) -> float:
        """What the running process takes from the GPU: its share plus what lies outside it."""
        return self.share_gib + self.overhead_gib

    @property
    def kv_gib_available(self) -> float:
        return self.share_gib - self.weights_gib - self.activations_gib

    @property
    def kv_gib_needed(self) -> float:
        return self.kv_tokens_needed * self.kv_kib_per_token / GIB_IN_KIB

    @property
    def kv_tokens_available(self) -> int:
        return max(int(self.kv_gib_available * GIB_IN_KIB / self.kv_kib_per_token), 0) if self.kv_kib_per_token else 0

    @property
    def headroom_gib(self) -> float:
        """Share left after weights, activations and the minimum KV cache (negative: does not fit)."""
        return self.kv_gib_available - self.kv_gib_needed

    @property
    def share_needed(self) -> float:
        """The smallest --gpu-memory-utilization that holds weights, activations and the minimum KV cache."""
        return (self.weights_gib + self.activations_gib + self.kv_gib_needed) / self.gpu_gib


def backend_memory(name: str, backend: Backend, host: GpuHost) -> BackendMemory:
    share = backend.gpu_memory_utilization or 0.0
    base = BackendMemory(name=name, on_demand=backend.on_demand, share=share, gpu_gib=host.gpu_memory_gb,
                         overhead_gib=host.process_overhead_gib)
    memory = backend.memory
    if memory is None:
        return base
    gpus = backend.tensor_parallel_size
    stored = memory.weights_gib / gpus
    quantization = arg_value(backend.args, "--quantization")
    bits = LOAD_TIME_QUANTIZATION.get(quantization or "")
    load_time = bits is not None and bits < BITS[memory.weights_dtype]
    weights = stored * bits / BITS[memory.weights_dtype] if load_time and bits else stored
    kv_fp8 = (arg_value(backend.args, "--kv-cache-dtype") or "auto").startswith("fp8")
    return BackendMemory(
        name=name, on_demand=backend.on_demand, share=share, gpu_gib=base.gpu_gib,
        overhead_gib=base.overhead_gib, declared=True, weights_gib=weights, load_peak_gib=stored,
        activations_gib=memory.activations_gib, load_time_quantization=quantization if load_time else None,
        kv_kib_per_token=memory.kv_cache_kib_per_token * (0.5 if kv_fp8 else 1.0) / gpus, kv_cache_fp8=kv_fp8,
        kv_tokens_needed=backend.context_length * backend.max_concurrency,
    )


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What each GPU of one host must hold: its always-on backends (started one after another, in
    catalog order) plus, at worst, its largest on-demand one (the scaler never runs more than fits)."""

    host_name: str
    host: GpuHost
    backends: dict[str, BackendMemory]

    @property
    def gpu_gib(self) -> float:
        return self.host.gpu_memory_gb

    @property
    def budget_gib(self) -> float:
        """What the backends may take from each GPU, after the host's headroom."""
        return self.gpu_gib * (1.0 - self.host.headroom)

    @property
    def always_on(self) -> dict[str, BackendMemory]:
        return {n: b for n, b in self.backends.items() if not b.on_demand}

    @property
    def on_demand(self) -> dict[str, BackendMemory]:
        return {n: b for n, b in self.backends.items() if b.on_demand}

    @property
    def always_on_gib(self) -> float:
        return sum(b.footprint_gib for b in self.always_on.values())

    @property
    def worst_case_gib(self) -> float:
        return self.always_on_gib + max((b.footprint_gib for b in self.on_demand.values()), default=0.0)

    def running_before(self, name: str) -> list[str]:
        """The backends already on the GPU when `name` starts: the always-on ones before it in
        catalog order (pulumi starts them one after another), or all always-on ones for an on-demand one."""
        always = list(self.always_on)
        return always[:always.index(name)] if name in always else always

    def free_gib_for(self, name: str) -> float:
        return self.budget_gib - sum(self.backends[n].footprint_gib for n in self.running_before(name))

    def problems(self) -> list[tuple[str | None, str, str]]:
        """(backend or None for the host, the field at fault, message) for each way the plan does not fit."""
        problems: list[tuple[str | None, str, str]] = []
        for name, b in self.backends.items():
            if b.declared and b.headroom_gib < -_EPSILON:
                problems.append((name, "gpu_memory_utilization", (
                    f"needs {b.weights_gib + b.activations_gib + b.kv_gib_needed:.1f} GiB per GPU (weights "
                    f"{b.weights_gib:.1f}, activations {b.activations_gib:.1f}, KV cache {b.kv_gib_needed:.1f} for "
                    f"{b.kv_tokens_needed:,} tokens = context_length x max_concurrency) but its share {b.share:g} of "
                    f"{self.gpu_gib:g} GiB is {b.share_gib:.1f} GiB: raise it to at least {b.share_needed:.2f}, or "
                    f"lower max_concurrency or context_length"
                    + ("" if b.kv_cache_fp8 else ", or halve the KV cache with --kv-cache-dtype fp8"))))
            free = self.free_gib_for(name)
            if b.declared and b.load_time_quantization and b.load_peak_gib + b.overhead_gib > free + _EPSILON:
                problems.append((name, "args", (
                    f"--quantization {b.load_time_quantization} quantizes while loading, so vLLM first puts the "
                    f"{b.load_peak_gib:.1f} GiB of 16-bit weights on the GPU, but only {free:.1f} GiB are free when it "
                    f"starts{self._next_to(name)}: use a pre-quantized `checkpoint` (an FP8 or AWQ build of the model)")))
        always = self.always_on_gib
        if always > self.budget_gib + _EPSILON:
            problems.append((None, "", (
                f"always-on backends need {always:.1f} GiB per GPU (shares {self._shares(self.always_on)} of "
                f"{self.gpu_gib:g} GiB, plus {self.host.process_overhead_gib:g} GiB each outside the share) but "
                f"{self.budget_gib:.1f} GiB are left after {self.host.headroom:.0%} headroom")))
            return problems
        problems += [
            (name, "gpu_memory_utilization", (
                f"on-demand backend can never start: its {b.footprint_gib:.1f} GiB (share {b.share:g} plus "
                f"{b.overhead_gib:g} GiB outside it) on top of the always-on {always:.1f} GiB exceed "
                f"{self.host_name}'s {self.budget_gib:.1f} GiB"))
            for name, b in self.on_demand.items()
            if always + b.footprint_gib > self.budget_gib + _EPSILON
        ]
        return problems

    def _next_to(self, name: str) -> str:
        before = self.running_before(name)
        return f" next to {', '.join(before)}" if before else ""

    def _shares(self, backends: dict[str, BackendMemory]) -> str:
        return " + ".join(f"{b.share:g}" for b in backends.values())

    def table(self) -> str:
        """The plan for a person: one row per backend, then the host's totals."""
        header = ("backend", "start", "share", "GiB", "weights", "load peak", "activ.", "KV GiB", "KV tokens",
                  "needed", "headroom")
        rows: list[tuple[str, ...]] = []
        for b in self.backends.values():
            start = "on demand" if b.on_demand else "always"
            if not b.declared:
                rows.append((b.name, start, f"{b.share:g}", f"{b.share_gib:.1f}", *["-"] * 6, "no `memory` given"))
                continue
            rows.append((b.name, start, f"{b.share:g}", f"{b.share_gib:.1f}", f"{b.weights_gib:.1f}",
                         f"{b.load_peak_gib:.1f}", f"{b.activations_gib:.1f}", f"{b.kv_gib_available:.1f}",
                         f"{b.kv_tokens_available:,}", f"{b.kv_tokens_needed:,}", f"{b.headroom_gib:+.1f} GiB"))
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                 for row in (header, *rows)]
        gpus = f"{self.host.gpu_count} x " if self.host.gpu_count > 1 else ""
        lines.append(
            f"{self.host_name}: {gpus}{self.gpu_gib:g} GiB, {self.budget_gib:.1f} after {self.host.headroom:.0%} headroom; "
            f"always-on {self.always_on_gib:.1f} GiB, worst case with the largest on-demand backend "
            f"{self.worst_case_gib:.1f} GiB (each process counts {self.host.process_overhead_gib:g} GiB outside its share)"
        )
        return "\n".join(lines)


def memory_plan(catalog: Catalog, host_name: str) -> MemoryPlan:
    """The plan for one host: one vLLM process per replica placed on it (``name``, or ``name#2``
    for the second replica of a backend that has several, as the proxy labels them)."""
    host = catalog.hosts[host_name]
    backends: dict[str, BackendMemory] = {}
    for name, backend in catalog.backends.items():
        if not backend.gpu_memory_utilization:
            continue
        replicas = backend.replica_list()
        for index, replica in enumerate(replicas):
            if replica.host == host_name:
                label = name if len(replicas) == 1 else f"{name}#{index + 1}"
                backends[label] = backend_memory(label, backend, host)
    return MemoryPlan(host_name=host_name, host=host, backends=backends)
