"""`dreamseed policies diff`'s report: the semantic diff and the replay, as text for a terminal or
as Markdown for a pull-request comment."""

from __future__ import annotations

from collections.abc import Iterator

from ..policy import Policies
from ..policy.diff import PolicyDiff
from ..replay import Replay, Traffic

SECTIONS = (("rules", "Routing rules"), ("backends", "Backends"), ("hosts", "GPU hosts"), ("rag", "Retrieval (rag.yaml)"),
            ("scale", "On-demand backends (scale.yaml)"))


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def _backend_label(policies: Policies, name: str) -> str:
    backend = policies.catalog.backends.get(name)
    if backend is None:
        return name
    notes = [*(["on demand"] if backend.on_demand else []), *backend.hosts()]
    return f"{name} ({', '.join(notes)})" if notes else name


def render(diff: PolicyDiff, base: Policies, head: Policies, replay: Replay | None, traffic: Traffic | None,
           markdown: bool) -> str:
    return "\n".join(_lines(diff, base, head, replay, traffic, markdown)) + "\n"


def _lines(diff: PolicyDiff, base: Policies, head: Policies, replay: Replay | None, traffic: Traffic | None,
           md: bool) -> Iterator[str]:
    yield "## DreamSeed policy diff" if md else "policy diff"
    if not diff.changes:
        yield "" if md else ""
        yield "No change to rules, backends, retrieval or scaling."
    for section, title in SECTIONS:
        changes = [c for c in diff.changes if c.section == section]
        if not changes:
            continue
        yield ""
        yield f"### {title}" if md else f"{title}:"
        for change in changes:
            subject = f"`{change.subject}`" if md else change.subject
            detail = change.detail if change.what in ("added", "removed", "moved") else f"{subject}: {change.detail}"
            yield f"- {detail}" if md else f"  {detail}"
    yield ""
    yield "### GPU memory per host (always on / worst case)" if md else "GPU memory per host (always on / worst case):"
    if md:
        yield "| host | before | after | budget |"
        yield "|---|---|---|---|"
    for plan in diff.plans:
        before = f"{_gib(plan.before_gib)} / {_gib(plan.worst_before_gib)}"
        after = f"{_gib(plan.after_gib)} / {_gib(plan.worst_after_gib)}"
        yield (f"| {plan.host} | {before} | {after} | {plan.budget_gib:.1f} GiB |" if md
               else f"  {plan.host}: {before} -> {after} (budget {plan.budget_gib:.1f} GiB)")
    if replay is None or traffic is None:
        return
    yield ""
    yield "### Replayed traffic" if md else "replayed traffic:"
    moved = sum(replay.moved.values())
    share = f" ({moved / replay.total:.1%})" if replay.total else ""
    yield (f"{replay.total} requests replayed through both policies; **{moved}** change rule or backend{share}." if md
           else f"  {replay.total} requests replayed; {moved} change rule or backend{share}")
    if traffic.unreadable:
        listed = ", ".join(f"line {n}: {why}" for n, why in traffic.unreadable[:5])
        more = f" and {len(traffic.unreadable) - 5} more" if len(traffic.unreadable) > 5 else ""
        yield f"{'' if md else '  '}{len(traffic.unreadable)} line(s) could not be read ({listed}{more})."
    if replay.moved:
        if md:
            yield ""
            yield "| requests | from (rule → backend) | to (rule → backend) | for example |"
            yield "|---:|---|---|---|"
        for move, count in replay.moved.most_common():
            rule_from, backend_from, rule_to, backend_to = move
            examples = replay.examples.get(move, [])
            if md:
                shown = "<br>".join("`" + e.replace("|", "/").replace("`", "'") + "`" for e in examples)
                yield f"| {count} | {rule_from} → {backend_from} | {rule_to} → {backend_to} | {shown} |"
            else:
                yield f"  {count:6d}  {rule_from}/{backend_from} -> {rule_to}/{backend_to}"
                for example in examples:
                    yield f"          e.g. {example}"
    yield ""
    yield "### Requests per backend" if md else "requests per backend (before -> after):"
    if md:
        yield "| backend | before | after | keyword starts | simulated starts |"
        yield "|---|---:|---:|---|---|"
    names = list(dict.fromkeys([*base.catalog.backends, *head.catalog.backends]))
    for name in names:
        sent_before, sent_after = replay.before.backends[name], replay.after.backends[name]
        on_demand = name in base.scale.backends or name in head.scale.backends
        keyword = f"{replay.before.keyword_starts[name]} -> {replay.after.keyword_starts[name]}" if on_demand else ""
        starts = (f"{replay.before.starts[name]} -> {replay.after.starts[name]}" if on_demand and replay.timed
                  else ("no times in the traffic" if on_demand else ""))
        label = _backend_label(head if name in head.catalog.backends else base, name)
        if md:
            yield f"| {label} | {sent_before} | {sent_after} | {keyword} | {starts} |"
        else:
            extra = f"; keyword-triggered requests {keyword}; starts {starts}" if on_demand else ""
            yield f"  {label}: {sent_before} -> {sent_after}{extra}"
    for side, what in ((replay.before, "base"), (replay.after, "head")):
        if side.unknown_model:
            yield f"{'' if md else '  '}{side.unknown_model} request(s) name a model the {what} does not serve."
