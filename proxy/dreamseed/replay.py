"""Recorded requests replayed through two policy generations' routers: what a policy change moves.

Traffic comes as JSON lines, one request each, in either of two shapes:
  a request body      {"model": ..., "messages": [...]} (chat) or {"model": ..., "prompt": ...}
                      (completions), as a client sends it; an optional "ts" (Unix seconds) places it
                      in time
  an access log line  what `dreamseed serve --log-prompts` writes: its `prompt` (the text of all
                      messages, as one user message here) requested as `auto`, or as the backend
                      a `direct` line named, at its `ts`. Rules scoped to the last user message
                      see the whole text: request bodies replay exactly, log lines nearly.
A line that is neither is counted and reported with its number, never dropped silently.

Each request is routed by the proxy's own Router for both generations (the compiled rules the proxy
runs). The on-demand backends' starts are simulated from their scale.yaml triggers where the traffic
has times: a keyword start, or `volume.requests` requests within `volume.window` while stopped, and
a stop after `idle_stop` without requests.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policy import AUTO_MODEL, DIRECT_RULE, OnDemand, Policies
from .routing import Prompt, Router, UnknownModelError

EXAMPLES = 3  # example prompts kept per move
EXAMPLE_CHARS = 120


@dataclass(frozen=True, slots=True)
class Recorded:
    line: int
    model: str
    prompt: Prompt
    ts: float | None


@dataclass
class Traffic:
    requests: list[Recorded] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)


def _from_line(number: int, data: Any) -> Recorded | str:
    if not isinstance(data, dict):
        return "not a JSON object"
    ts = data.get("ts")
    ts = float(ts) if isinstance(ts, int | float) else None
    if "messages" in data or ("prompt" in data and "request_id" not in data):
        model = data.get("model", AUTO_MODEL)
        if not isinstance(model, str):
            return "`model` is not a string"
        messages = data.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return "`messages` is not a list of objects"
            return Recorded(number, model, Prompt(messages=messages), ts)
        return Recorded(number, model, Prompt(prompt=data["prompt"]), ts)
    if "request_id" in data and "rule" in data:  # an access log line
        if not isinstance(data.get("prompt"), str):
            return "an access log line without `prompt` (written without --log-prompts)"
        model = data.get("backend", AUTO_MODEL) if data["rule"] == DIRECT_RULE else AUTO_MODEL
        return Recorded(number, str(model), Prompt.of_text(data["prompt"]), ts)
    return "neither a request body (`messages` or `prompt`) nor an access log line"


def read_traffic(path: Path, lines: Iterable[str] | None = None) -> Traffic:
    traffic = Traffic()
    source = lines if lines is not None else path.open(encoding="utf-8", errors="replace")
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            traffic.unreadable.append((number, f"not JSON: {exc.msg}"))
            continue
        parsed = _from_line(number, data)
        if isinstance(parsed, str):
            traffic.unreadable.append((number, parsed))
        else:
            traffic.requests.append(parsed)
    return traffic


@dataclass
class Side:
    """One generation's account of the traffic."""

    backends: Counter[str] = field(default_factory=Counter)
    keyword_starts: Counter[str] = field(default_factory=Counter)  # requests that would start an on-demand backend
    starts: Counter[str] = field(default_factory=Counter)  # simulated starts, where the traffic has times
    unknown_model: int = 0


@dataclass
class Replay:
    total: int = 0
    moved: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)  # (rule, backend) before -> after
    examples: dict[tuple[str, str, str, str], list[str]] = field(default_factory=dict)
    before: Side = field(default_factory=Side)
    after: Side = field(default_factory=Side)
    timed: bool = False  # every request had a time: starts were simulated


class _OnDemandClock:
    """A backend's scale.yaml triggers, played over request times."""

    def __init__(self, settings: OnDemand) -> None:
        self.settings = settings
        self.running_until: float | None = None  # idle-stopped after this time
        self.recent: deque[float] = deque()

    def request(self, ts: float, keyword: bool) -> bool:
        """One request routed to the backend at ``ts``; True when it starts the backend."""
        if self.running_until is not None and ts <= self.running_until:
            self.running_until = ts + self.settings.idle_stop
            return False
        triggers = self.settings.triggers
        start = keyword and triggers.keywords
        if not start and triggers.volume is not None:
            self.recent.append(ts)
            while self.recent and self.recent[0] < ts - triggers.volume.window:
                self.recent.popleft()
            start = len(self.recent) > triggers.volume.requests
        if start:
            self.recent.clear()
            self.running_until = ts + max(self.settings.idle_stop, self.settings.min_uptime)
        return start


def replay(base: Policies, head: Policies, traffic: Traffic) -> Replay:
    routers = (Router(base.routing, base.catalog), Router(head.routing, head.catalog))
    scales = (base.scale.backends, head.scale.backends)
    result = Replay(total=len(traffic.requests))
    result.timed = bool(traffic.requests) and all(r.ts is not None for r in traffic.requests)
    clocks: tuple[dict[str, _OnDemandClock], ...] = ({}, {})
    ordered = sorted(traffic.requests, key=lambda r: r.ts or 0.0) if result.timed else traffic.requests
    for request in ordered:
        outcome: list[tuple[str, str]] = []
        for index, (router, side) in enumerate(zip(routers, (result.before, result.after), strict=True)):
            try:
                decision = router.route(request.model, request.prompt)
            except UnknownModelError:
                side.unknown_model += 1
                outcome.append(("unknown model", "-"))
                continue
            backend = decision.backend
            side.backends[backend] += 1
            outcome.append((decision.rule, backend))
            settings = scales[index].get(backend)
            if settings is None:
                continue
            if decision.keyword and settings.triggers.keywords:
                side.keyword_starts[backend] += 1
            if result.timed:
                clock = clocks[index].setdefault(backend, _OnDemandClock(settings))
                assert request.ts is not None
                if clock.request(request.ts, decision.keyword):
                    side.starts[backend] += 1
        if outcome[0] != outcome[1]:
            move = (*outcome[0], *outcome[1])
            result.moved[move] += 1
            examples = result.examples.setdefault(move, [])
            if len(examples) < EXAMPLES:
                text = " ".join(request.prompt.text("all").split())
                examples.append(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 1] + "…")
    return result
