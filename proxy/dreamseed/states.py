"""What the proxy knows of each backend right now (:class:`BackendState`): the one view that
/readyz, /admin/backends and the state gauges of /metrics share."""

from __future__ import annotations

from typing import Any

import msgspec

from .backends import Upstreams
from .scaling import Scaler


class BackendState(msgspec.Struct, omit_defaults=True):
    """One backend as the proxy sees it now: the one view /readyz, /admin/backends and the
    metrics share. `state` follows the circuit, so the health verdict and routing agree: up
    (circuit closed, last probe or request fine), failing (circuit still closed, but the last
    probe or request failed: `unhealthy_threshold` failures in a row open it), down (circuit
    open or half-open: routing skips it), unknown (not probed yet), unavailable (not
    configured), or an on-demand backend's scaler state while it is not ready."""

    state: str
    circuit: str | None
    detail: str | None
    on_demand: bool
    in_flight: int
    queued: int
    scaler: dict[str, Any] | None = None


def backend_states(upstreams: Upstreams, scaler: Scaler | None = None) -> dict[str, BackendState]:
    states: dict[str, BackendState] = {}
    for upstream in upstreams:
        circuit = upstream.circuit
        if circuit is None:
            state, detail = "unavailable", upstream.unavailable
        elif not circuit.probed:
            state, detail = "unknown", None
        else:
            state = "down" if circuit.state != "closed" else ("failing" if circuit.last_error else "up")
            detail = circuit.last_error
        view = BackendState(state, circuit.state if circuit else None, detail, upstream.backend.on_demand,
                            upstream.transport.in_use if upstream.transport else 0,
                            upstream.transport.waiting if upstream.transport else 0)
        if scaler is not None and scaler.manages(upstream.name):
            view.scaler = scaler.status(upstream.name)
            if view.scaler["state"] != "ready":
                view.state = view.scaler["state"]
        states[upstream.name] = view
    return states
