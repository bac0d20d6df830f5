"""What the proxy knows of each backend right now (:class:`BackendState`): the one view that
/readyz, /admin/backends and the state gauges of /metrics share."""

from __future__ import annotations

from typing import Any

import msgspec

from .backends import Upstream, Upstreams
from .scaling import Scaler


class ReplicaState(msgspec.Struct, omit_defaults=True):
    """One replica of a backend that has several: the same fields as its backend's view, plus
    how many requests its conversation starts sent here (affinity hits) or here because the
    replica they map to was over its load bound (spills)."""

    replica: str
    url: str | None
    state: str
    circuit: str | None
    detail: str | None
    in_flight: int
    queued: int
    affinity_hits: int = 0
    affinity_spills: int = 0
    server_queue: float = 0.0


class BackendState(msgspec.Struct, omit_defaults=True):
    """One backend as the proxy sees it now: the one view /readyz, /admin/backends and the
    metrics share. `state` follows the circuit, so the health verdict and routing agree: up
    (circuit closed, last probe or request fine), failing (circuit still closed, but the last
    probe or request failed: `unhealthy_threshold` failures in a row open it), down (circuit
    open or half-open: routing skips it), unknown (not probed yet), unavailable (not
    configured), or an on-demand backend's scaler state while it is not ready. A backend of
    several replicas is as good as its best replica (routing uses any that is up), and lists
    each under `replicas`."""

    state: str
    circuit: str | None
    detail: str | None
    on_demand: bool
    in_flight: int
    queued: int
    scaler: dict[str, Any] | None = None
    replicas: list[ReplicaState] | None = None


# Best first: the state of a backend of several replicas is its best replica's.
_RANK = {"up": 0, "failing": 1, "unknown": 2, "down": 3, "unavailable": 4}


def _replica_state(upstream: Upstream) -> ReplicaState:
    circuit = upstream.circuit
    if circuit is None:
        state, detail = "unavailable", upstream.unavailable
    elif not circuit.probed:
        state, detail = "unknown", None
    else:
        state = "down" if circuit.state != "closed" else ("failing" if circuit.last_error else "up")
        detail = circuit.last_error
    transport = upstream.transport
    return ReplicaState(upstream.label, upstream.url, state, circuit.state if circuit else None, detail,
                        transport.in_use if transport else 0, transport.waiting if transport else 0,
                        upstream.affinity_hits, upstream.affinity_spills, upstream.reported_queue)


def backend_states(upstreams: Upstreams, scaler: Scaler | None = None) -> dict[str, BackendState]:
    states: dict[str, BackendState] = {}
    for replicas in upstreams.sets():
        views = [_replica_state(upstream) for upstream in replicas]
        best = min(views, key=lambda v: _RANK[v.state])
        view = BackendState(best.state, best.circuit, best.detail, replicas.backend.on_demand,
                            sum(v.in_flight for v in views), sum(v.queued for v in views),
                            replicas=views if len(views) > 1 else None)
        if scaler is not None and scaler.manages(replicas.name):
            view.scaler = scaler.status(replicas.name)
            if view.scaler["state"] != "ready":
                view.state = view.scaler["state"]
        states[replicas.name] = view
    return states
