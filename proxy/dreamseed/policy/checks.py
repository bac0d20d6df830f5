"""Cross-file checks: what the schema alone cannot say (references between files, fallback
cycles, ports, GPU budgets, templates). Each problem names the file, the line and the field."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..yamlsource import PathKey, YamlSource
from .capacity import memory_plan
from .schema import (
    AUTO_MODEL,
    DIRECT_RULE,
    LATENCY_BUCKETS,
    TEMPLATE_FIELDS,
    Augmentation,
    Catalog,
    DockerActuator,
    PolicyProblem,
    Rag,
    Routing,
    Scale,
)


def field_name(path: list[PathKey] | tuple[PathKey, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _problem(source: YamlSource, path: tuple[PathKey, ...], message: str) -> PolicyProblem:
    return PolicyProblem(source.file, source.line_of(path), field_name(path), message)


def check_catalog(source: YamlSource, catalog: Catalog) -> list[PolicyProblem]:
    """The catalog's own consistency."""
    problems: list[PolicyProblem] = []
    model_owner: dict[str, str] = {}
    for name, backend in catalog.backends.items():
        at = ("backends", name)
        if backend.replicas is not None:
            for field in ("url", "url_env", "host"):
                if getattr(backend, field) is not None:
                    problems.append(_problem(source, (*at, field),
                                             f"give `{field}` per replica under `replicas`, not for the backend"))
            places: list[tuple[PathKey, ...]] = [(*at, "replicas", index) for index in range(len(backend.replicas))]
        else:
            places = [at]
        if backend.discover == "dns" and backend.replicas is not None:
            problems.append(_problem(source, (*at, "discover"), "`discover: dns` finds the replicas from `url`'s "
                                     "host name: give `url` (or `url_env`), not `replicas`"))
        seen_urls: dict[str, int] = {}
        for index, (where, replica) in enumerate(zip(places, backend.replica_list(), strict=True)):
            if replica.url is None and replica.url_env is None:
                problems.append(_problem(source, where, "needs `url` or `url_env`"))
            if replica.url is not None:
                parts = urlsplit(replica.url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    problems.append(_problem(source, (*where, "url"), f"not an http(s) URL: {replica.url!r}"))
                elif parts.path not in ("", "/") or parts.query:
                    problems.append(_problem(source, (*where, "url"),
                                             "give the server's base URL without a path (the proxy adds /v1/...)"))
                elif replica.url.rstrip("/") in seen_urls:
                    problems.append(_problem(source, (*where, "url"), f"the same URL as replica "
                                             f"{seen_urls[replica.url.rstrip('/')]}: each replica is its own server"))
                seen_urls.setdefault(replica.url.rstrip("/"), index)
            if replica.host is not None and replica.host not in catalog.hosts:
                problems.append(_problem(source, (*where, "host"),
                                         f"unknown host {replica.host!r} (known: {_known(catalog.hosts)})"))
            if backend.replicas is not None and (replica.host is None) != (backend.gpu_memory_utilization is None):
                problems.append(_problem(source, where, "with `gpu_memory_utilization`, every replica needs a `host` "
                                         "(and a replica's `host` needs the backend's `gpu_memory_utilization`)"))
        if backend.model in model_owner:
            problems.append(
                _problem(source, (*at, "model"),
                         f"model id {backend.model!r} is already served by {model_owner[backend.model]!r}")
            )
        model_owner.setdefault(backend.model, name)
        if backend.model in catalog.backends and backend.model != name:
            problems.append(_problem(source, (*at, "model"), f"model id {backend.model!r} is also a backend name"))
        if backend.latency_target not in LATENCY_BUCKETS:
            buckets = ", ".join(f"{b:g}" for b in LATENCY_BUCKETS)
            problems.append(_problem(source, (*at, "latency_target"),
                                     f"must be one of the latency histogram's buckets: {buckets}"))
        if backend.replicas is None and (backend.host is None) != (backend.gpu_memory_utilization is None):
            problems.append(_problem(source, at, "`host` and `gpu_memory_utilization` go together"))
    problems += _check_gpu_budget(source, catalog)
    return problems


def _check_gpu_budget(source: YamlSource, catalog: Catalog) -> list[PolicyProblem]:
    """Every host's memory plan must fit: each backend's share holds its weights, activations and
    minimum KV cache; a load-time quantization's 16-bit peak fits what is free when it starts; the
    always-on set fits the card; and each on-demand backend can start next to it."""
    problems: list[PolicyProblem] = []
    for host_name in catalog.hosts:
        for backend, field, message in memory_plan(catalog, host_name).problems():
            # A replica is planned as `name#2`, say: the problem is the backend's.
            at = ("hosts", host_name) if backend is None else ("backends", backend.split("#")[0], field)
            problems.append(_problem(source, at, message))
    return problems


def check_routing(source: YamlSource, routing: Routing, catalog: Catalog) -> list[PolicyProblem]:
    problems: list[PolicyProblem] = []
    seen_names: set[str] = set()
    catch_all: int | None = None
    reserved = {AUTO_MODEL, *catalog.backends, *(b.model for b in catalog.backends.values())}
    for index, rule in enumerate(routing.rules):
        at: tuple[PathKey, ...] = ("rules", index)
        if rule.name in seen_names:
            problems.append(_problem(source, (*at, "name"), f"duplicate rule name {rule.name!r}"))
        seen_names.add(rule.name)
        if catch_all is not None:
            problems.append(
                _problem(
                    source, at, f"unreachable: rule {routing.rules[catch_all].name!r} before it matches every request"
                )
            )
        for position, backend in enumerate(rule.chain):
            if backend not in catalog.backends:
                field = (*at, "target") if position == 0 else (*at, "fallback", position - 1)
                problems.append(
                    _problem(source, field, f"unknown backend {backend!r} (known: {_known(catalog.backends)})")
                )
        if len(set(rule.chain)) != len(rule.chain):
            problems.append(
                _problem(source, (*at, "fallback"), "fallback cycle: " + " -> ".join(rule.chain) + " repeats a backend")
            )
        match = rule.match
        if match is None or match.is_empty():
            catch_all = index if catch_all is None else catch_all
            continue
        if match.regex is not None:
            try:
                re.compile(match.regex)
            except re.error as exc:
                problems.append(_problem(source, (*at, "match", "regex"), f"invalid regular expression: {exc}"))
        for bound in ("chars", "tokens"):
            over, under = getattr(match, f"{bound}_over"), getattr(match, f"{bound}_under")
            if over is not None and under is not None and under <= over + 1:
                problems.append(
                    _problem(source, (*at, "match", f"{bound}_under"), f"{bound}_under must exceed {bound}_over + 1")
                )
        for position, alias in enumerate(match.models or ()):
            if alias in reserved:
                problems.append(
                    _problem(
                        source,
                        (*at, "match", "models", position),
                        f"{alias!r} is already a backend, a model id or 'auto'; it cannot be a rule alias",
                    )
                )
    if catch_all is None:
        problems.append(
            _problem(source, ("rules",), "no catch-all rule: the last rule must have no `match`, so every request has a route")
        )
    return problems


def check_rag(source: YamlSource, rag: Rag, catalog: Catalog | None, routing: Routing | None) -> list[PolicyProblem]:
    problems: list[PolicyProblem] = []
    embedder = rag.embedder
    if embedder.kind == "openai":
        if embedder.url is None and embedder.url_env is None:
            problems.append(_problem(source, ("embedder",), "an `openai` embedder needs `url` or `url_env`"))
        if embedder.dim is None:
            problems.append(_problem(source, ("embedder", "dim"), "an `openai` embedder must state `dim`"))
    if embedder.url is not None:
        parts = urlsplit(embedder.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(_problem(source, ("embedder", "url"), f"not an http(s) URL: {embedder.url!r}"))
    if rag.chunking.overlap >= rag.chunking.size // 2:
        problems.append(_problem(source, ("chunking", "overlap"), "must be less than half of `size`"))
    layers: list[tuple[tuple[PathKey, ...], Augmentation]] = [(("defaults",), rag.defaults)]
    layers += [(("backends", name), layer) for name, layer in rag.backends.items()]
    layers += [(("rules", name), layer) for name, layer in rag.rules.items()]
    for at, layer in layers:
        if layer.template is not None:
            problem = _template_problem(layer.template)
            if problem:
                problems.append(_problem(source, (*at, "template"), problem))
    if catalog is not None:
        for name in rag.backends:
            if name not in catalog.backends:
                problems.append(_problem(source, ("backends", name),
                                         f"unknown backend {name!r} (known: {_known(catalog.backends)})"))
    if routing is not None:
        rule_names = {rule.name: None for rule in routing.rules} | {DIRECT_RULE: None}
        for name in rag.rules:
            if name not in rule_names:
                problems.append(_problem(source, ("rules", name), f"unknown routing rule {name!r} (known: {_known(rule_names)})"))
    return problems


def check_scale(source: YamlSource, scale: Scale, catalog: Catalog | None) -> list[PolicyProblem]:
    problems: list[PolicyProblem] = []
    if catalog is None:
        return problems
    for name, settings in scale.backends.items():
        at = ("backends", name)
        backend = catalog.backends.get(name)
        if backend is None:
            problems.append(_problem(source, at, f"unknown backend {name!r} (known: {_known(catalog.backends)})"))
        elif not backend.on_demand:
            problems.append(_problem(source, at, f"backend {name!r} is not `on_demand: true` in backends.yaml"))
        elif backend.replicas is not None and len(backend.replicas) > 1 and isinstance(settings.actuator, DockerActuator):
            # Replicas of an on-demand backend start and stop together; one container cannot be all of them.
            problems.append(_problem(source, (*at, "actuator"), (
                f"backend {name!r} has {len(backend.replicas)} replicas, which start and stop together, but a docker "
                "actuator starts one container: use a command actuator whose start and stop handle every replica")))
        if settings.cold_start == "wait" and settings.max_wait > settings.start_timeout:
            problems.append(_problem(source, (*at, "max_wait"), "longer than `start_timeout`: a request would outwait the start"))
        if settings.backoff > settings.backoff_max:
            problems.append(_problem(source, (*at, "backoff"), "must not exceed `backoff_max`"))
    for name, backend in catalog.backends.items():
        if backend.on_demand and name not in scale.backends:
            problems.append(_problem(source, ("backends",),
                                     f"on-demand backend {name!r} has no entry: nothing would ever start it"))
    return problems


def _template_problem(template: str) -> str | None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a valid template: {exc} (write literal braces as {{{{ and }}}})"
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        return f"unknown placeholder(s) {', '.join(sorted('{' + f + '}' for f in unknown))}; use {{context}} and {{query}}"
    if "context" not in fields:
        return "the template must contain {context}"
    return None


def _known(names: Mapping[str, object]) -> str:
    return ", ".join(sorted(names)) or "none"
