"""What a change to `policies/` does, in the policies' own terms: `dreamseed policies diff`.

Rules are compared by name (added, removed, moved in the order, each changed field: keywords added
and removed, thresholds, targets, fallbacks), backends by name (each changed setting), rag.yaml and
scale.yaml setting by setting, and each GPU host's memory plan before and after. Values are compared
as their YAML would be written (msgspec's builtins), so a default spelt out is no change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .capacity import memory_plan
from .schema import Policies


@dataclass(frozen=True)
class Change:
    section: str  # rules, backends, rag, scale
    subject: str  # the rule or backend, or the setting's path
    what: str  # added, removed, changed, moved
    detail: str  # one line for a person


@dataclass(frozen=True)
class HostPlan:
    host: str
    before_gib: float | None  # always-on GiB per GPU, None where the host was not in the catalog
    after_gib: float | None
    worst_before_gib: float | None
    worst_after_gib: float | None
    budget_gib: float
    problems: list[str]  # the head's plan that does not fit, with the numbers


@dataclass
class PolicyDiff:
    changes: list[Change] = field(default_factory=list)
    plans: list[HostPlan] = field(default_factory=list)

    @property
    def head_fits(self) -> bool:
        return not any(plan.problems for plan in self.plans)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return "none" if value is None else str(value)


def _settings(section: str, subject: str, before: Any, after: Any, path: str = "") -> list[Change]:
    """Each setting that differs between two builtins trees, as a dotted path."""
    if isinstance(before, dict) and isinstance(after, dict):
        changes: list[Change] = []
        for key in [*before, *(k for k in after if k not in before)]:
            changes += _settings(section, subject, before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
        return changes
    if before == after:
        return []
    if isinstance(before, list) and isinstance(after, list) and all(isinstance(v, str) for v in [*before, *after]):
        added = [v for v in after if v not in before]
        removed = [v for v in before if v not in after]
        if added or removed:
            parts = ([f"+{_show(added)}"] if added else []) + ([f"-{_show(removed)}"] if removed else [])
            return [Change(section, subject, "changed", f"{path}: {' '.join(parts)}")]
    return [Change(section, subject, "changed", f"{path}: {_show(before)} -> {_show(after)}")]


def _by_name(section: str, before: Mapping[str, Any], after: Mapping[str, Any], noun: str) -> list[Change]:
    changes: list[Change] = []
    for name in before:
        if name not in after:
            changes.append(Change(section, name, "removed", f"{noun} {name} removed"))
    for name, settings in after.items():
        if name not in before:
            changes.append(Change(section, name, "added", f"{noun} {name} added: {_show(settings)}"))
        else:
            changes += _settings(section, name, before[name], settings)
    return changes


def _rule_order(before: list[str], after: list[str]) -> list[Change]:
    kept_before = [n for n in before if n in after]
    kept_after = [n for n in after if n in before]
    if kept_before == kept_after:
        return []
    return [Change("rules", name, "moved", f"rule {name}: position {kept_before.index(name) + 1} -> "
                   f"{kept_after.index(name) + 1} (rules are tried in order)")
            for name in kept_after if kept_before.index(name) != kept_after.index(name)]


def policy_diff(base: Policies, head: Policies) -> PolicyDiff:
    """The semantic difference from ``base`` to ``head`` (both already checked)."""
    diff = PolicyDiff()
    rules_before = {rule.name: msgspec.to_builtins(rule) for rule in base.routing.rules}
    rules_after = {rule.name: msgspec.to_builtins(rule) for rule in head.routing.rules}
    diff.changes += _by_name("rules", rules_before, rules_after, "rule")
    diff.changes += _rule_order(list(rules_before), list(rules_after))
    diff.changes += _by_name("backends", msgspec.to_builtins(base.catalog.backends),
                             msgspec.to_builtins(head.catalog.backends), "backend")
    diff.changes += _by_name("hosts", msgspec.to_builtins(base.catalog.hosts), msgspec.to_builtins(head.catalog.hosts),
                             "host")
    rag_before, rag_after = msgspec.to_builtins(base.rag), msgspec.to_builtins(head.rag)
    diff.changes += _settings("rag", "rag.yaml", rag_before, rag_after)
    diff.changes += _by_name("scale", msgspec.to_builtins(base.scale.backends), msgspec.to_builtins(head.scale.backends),
                             "on-demand backend")
    for host in [*base.catalog.hosts, *(h for h in head.catalog.hosts if h not in base.catalog.hosts)]:
        before = memory_plan(base.catalog, host) if host in base.catalog.hosts else None
        after = memory_plan(head.catalog, host) if host in head.catalog.hosts else None
        problems = [f"{label or host}: {message}" for label, _, message in after.problems()] if after else []
        budget = (after or before).budget_gib  # type: ignore[union-attr]  # one of them exists
        diff.plans.append(HostPlan(
            host, before.always_on_gib if before else None, after.always_on_gib if after else None,
            before.worst_case_gib if before else None, after.worst_case_gib if after else None, budget, problems))
    return diff
