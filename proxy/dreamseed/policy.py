"""The policy schema: one typed definition of every file in ``policies/``.

Both the proxy and ``infra/`` read policies through :func:`load_policies`, so the backend
catalog's ports, models and limits mean the same thing everywhere. Loading is strict:
unknown fields, wrong types, dangling references and fallback cycles are errors that
name the file, the line and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct

from .yamlsource import PathKey, YamlSource, YamlSyntaxError, load_yaml

Name = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
EnvVar = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PositiveInt = Annotated[int, Meta(gt=0)]
Seconds = Annotated[float, Meta(gt=0, le=3600)]
Fraction = Annotated[float, Meta(gt=0, le=1)]

# Histogram buckets of the proxy's latency metrics (proxy/dreamseed/metrics.py). A backend's latency target
# must be one of them, so that SLO queries can use its `le` bucket exactly.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

BACKENDS_FILE = "backends.yaml"
ROUTING_FILE = "routing.yaml"
RAG_FILE = "rag.yaml"  # optional: without it, retrieval is off
SCALE_FILE = "scale.yaml"  # optional: without it, on-demand backends are treated as always there
# Models a client may always ask for, besides backends and aliases.
AUTO_MODEL = "auto"
# The rule name of requests that name a backend (or its model id) instead of "auto".
DIRECT_RULE = "direct"

T = TypeVar("T")


class Strict(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base for policy structs: a misspelt field is an error, never silently ignored.

    Subclasses restate ``frozen=True``: msgspec inherits it at run time, but type checkers
    (dataclass_transform) only see it where it is written."""


# --- backends.yaml ---------------------------------------------------------------------


class Timeouts(Strict, frozen=True):
    connect: Seconds = 5.0
    read: Seconds = 60.0
    write: Seconds = 30.0
    pool: Seconds = 10.0


class HealthCheck(Strict, frozen=True):
    """Active probes of the backend's /health plus passive counting of failed requests.
    `unhealthy_threshold` consecutive failures open the circuit (routing skips the backend);
    after `cooldown` a half-open probe runs, and `healthy_threshold` successes close it."""

    interval: Seconds = 5.0
    timeout: Seconds = 2.0
    healthy_threshold: PositiveInt = 1
    unhealthy_threshold: PositiveInt = 3
    cooldown: Seconds = 10.0


class GpuHost(Strict, frozen=True):
    gpu_memory_gb: Annotated[float, Meta(gt=0)]
    gpu_count: PositiveInt = 1
    headroom: Annotated[float, Meta(ge=0, lt=1)] = 0.05
    description: str = ""


class Backend(Strict, frozen=True):
    model: Annotated[str, Meta(min_length=1)]
    context_length: PositiveInt
    url: str | None = None
    url_env: EnvVar | None = None
    api_key_env: EnvVar | None = None
    max_concurrency: PositiveInt = 16
    # Requests that may wait for a free slot beyond max_concurrency (for up to timeouts.pool);
    # more are refused at once with 429, so a flood cannot grow the proxy's memory.
    max_queue: Annotated[int, Meta(ge=0)] = 64
    timeouts: Timeouts = Timeouts()
    # Extra attempts on connection errors and 502/503, before the first byte reaches the
    # client, with jittered backoff; then the rule's fallback chain takes over.
    retries: Annotated[int, Meta(ge=0, le=5)] = 1
    health: HealthCheck = HealthCheck()
    # The P95 time-to-first-token objective for this backend's SLO alerts (seed: 0.1 s for the
    # 7B class, 0.5 s for the 70B).
    latency_target: Seconds = 0.1
    on_demand: bool = False
    host: Name | None = None
    gpu_memory_utilization: Fraction | None = None
    tensor_parallel_size: PositiveInt = 1
    image: str | None = None
    args: list[str] = []
    description: str = ""

    def resolve_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The base URL to use now: ``url_env`` when set in the environment, else ``url``."""
        if self.url_env and environ.get(self.url_env):
            return environ[self.url_env].rstrip("/")
        return self.url.rstrip("/") if self.url else None


class Catalog(Strict, frozen=True):
    backends: dict[Name, Backend]
    hosts: dict[Name, GpuHost] = {}


# --- routing.yaml ----------------------------------------------------------------------

Scope = Literal["user", "last_user", "all"]


class Match(Strict, frozen=True):
    chars_over: Annotated[int, Meta(ge=0)] | None = None
    chars_under: PositiveInt | None = None
    tokens_over: Annotated[int, Meta(ge=0)] | None = None
    tokens_under: PositiveInt | None = None
    keywords: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = None
    regex: Annotated[str, Meta(min_length=1)] | None = None
    models: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = None
    scope: Scope = "user"

    def is_empty(self) -> bool:
        return all(
            value is None
            for value in (
                self.chars_over,
                self.chars_under,
                self.tokens_over,
                self.tokens_under,
                self.keywords,
                self.regex,
                self.models,
            )
        )


class Rule(Strict, frozen=True):
    name: Name
    target: Name
    match: Match | None = None
    fallback: list[Name] = []
    description: str = ""

    @property
    def chain(self) -> tuple[str, ...]:
        """Backends to try, in order: the target, then each fallback."""
        return (self.target, *self.fallback)


class Routing(Strict, frozen=True):
    rules: Annotated[list[Rule], Meta(min_length=1)]


# --- rag.yaml --------------------------------------------------------------------------

RetrievalMode = Literal["vector", "lexical", "hybrid"]
SqlName = Annotated[str, Meta(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]
DEFAULT_TEMPLATE = "Context:\n{context}\nQuery: {query}"
TEMPLATE_FIELDS = frozenset({"context", "query"})


class Embedder(Strict, frozen=True):
    """How text becomes vectors. `fastembed` runs the ONNX model in-process; `openai` calls an
    OpenAI-compatible /v1/embeddings server (the seed's vLLM embedding container on :8003)."""

    kind: Literal["fastembed", "openai"] = "fastembed"
    model: Annotated[str, Meta(min_length=1)] = "sentence-transformers/all-MiniLM-L6-v2"
    # Vector size. Known fastembed models supply it; an `openai` embedder or a custom local
    # model must state it.
    dim: PositiveInt | None = None
    # A local model folder (model.onnx + tokenizer.json + configs) for air-gapped sites.
    # Relative paths are taken from the state directory. Unset: <state>/models/<model>, as
    # written by `dreamseed rag setup-model`, if it exists; else fastembed downloads the model.
    model_path: str | None = None
    # For a local model fastembed does not know: how token vectors become one vector.
    pooling: Literal["mean", "cls"] = "mean"
    url: str | None = None
    url_env: EnvVar | None = None
    api_key_env: EnvVar | None = None
    batch_size: Annotated[int, Meta(gt=0, le=1024)] = 32
    timeout: Seconds = 10.0
    # POST /v1/embeddings requests embedding at once; more get 429, so a flood cannot queue
    # unbounded work (retrieval for routed requests is bounded by `budget` instead).
    max_pending: Annotated[int, Meta(ge=1, le=10000)] = 16


class Chunking(Strict, frozen=True):
    """Ingestion splits text into chunks of at most `size` characters on paragraph, then
    sentence boundaries; consecutive chunks share about `overlap` characters."""

    size: Annotated[int, Meta(ge=100, le=20000)] = 800
    overlap: Annotated[int, Meta(ge=0)] = 100


class VectorStore(Strict, frozen=True):
    table: SqlName = "documents"
    hnsw_m: Annotated[int, Meta(ge=2, le=100)] = 16
    hnsw_ef_construction: Annotated[int, Meta(ge=4, le=1000)] = 64
    # Candidates the HNSW scan keeps (recall vs latency); benchmarks/README.md has the numbers.
    ef_search: Annotated[int, Meta(ge=1, le=1000)] = 40
    # pgvector 0.8 iterative scans: keep scanning when a collection filter drops candidates.
    iterative_scan: Literal["off", "relaxed_order", "strict_order"] = "relaxed_order"


class Augmentation(Strict, frozen=True):
    """Retrieval settings for a request. Every field is optional here; `defaults` fills the
    gaps, then `backends.<target>`, then `rules.<rule>` (the most specific wins)."""

    enabled: bool | None = None
    collection: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    mode: RetrievalMode | None = None
    top_k: Annotated[int, Meta(ge=1, le=50)] | None = None
    # Lowest cosine similarity a vector hit needs (lexical hits have their own threshold).
    min_similarity: Annotated[float, Meta(ge=-1, le=1)] | None = None
    # Lowest pg_trgm word similarity of the query in a chunk for the trigram leg.
    min_word_similarity: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_context_chars: Annotated[int, Meta(ge=100, le=200000)] | None = None
    # Placeholders: {context} (the numbered hits) and {query} (the user's last message).
    template: Annotated[str, Meta(min_length=1)] | None = None


@dataclass(frozen=True, slots=True)
class RagSettings:
    """The settings one request retrieves with, all fields resolved."""

    enabled: bool
    collection: str
    mode: RetrievalMode
    top_k: int
    min_similarity: float
    min_word_similarity: float
    max_context_chars: int
    template: str


RAG_DEFAULTS = RagSettings(enabled=False, collection="default", mode="hybrid", top_k=4, min_similarity=0.3,
                           min_word_similarity=0.2, max_context_chars=4000, template=DEFAULT_TEMPLATE)


class Rag(Strict, frozen=True):
    embedder: Embedder = Embedder()
    chunking: Chunking = Chunking()
    store: VectorStore = VectorStore()
    # Time a request may spend retrieving (embedding + SQL) before it goes on without context.
    budget: Seconds = 0.25
    defaults: Augmentation = Augmentation()
    backends: dict[Name, Augmentation] = {}
    rules: dict[Name, Augmentation] = {}

    def settings(self, rule: str, backend: str) -> RagSettings:
        merged = {field: getattr(RAG_DEFAULTS, field) for field in RagSettings.__slots__}
        for layer in (self.defaults, self.backends.get(backend), self.rules.get(rule)):
            if layer is None:
                continue
            for field in merged:
                value = getattr(layer, field)
                if value is not None:
                    merged[field] = value
        return RagSettings(**merged)

    @property
    def used(self) -> bool:
        """Whether any request can retrieve (so the store and embedder are needed)."""
        layers = [self.defaults, *self.backends.values(), *self.rules.values()]
        return any(layer.enabled for layer in layers)


# --- scale.yaml ------------------------------------------------------------------------

LongSeconds = Annotated[float, Meta(gt=0, le=86400)]


class DockerActuator(Strict, frozen=True, tag_field="kind", tag="docker"):
    """Start/stop a container `infra/` declared, through the Docker Engine API on its unix socket."""

    container: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")]
    socket: str = "/var/run/docker.sock"
    api_version: Annotated[str, Meta(pattern=r"^1\.[0-9]{2}$")] = "1.43"
    # Seconds Docker gives the container to exit on stop before killing it.
    stop_grace: Annotated[int, Meta(ge=0, le=600)] = 30


class CommandActuator(Strict, frozen=True, tag_field="kind", tag="command"):
    """Start/stop with commands, run as argument lists (no shell, so nothing in them is
    interpreted). `status` exits 0 while the backend runs."""

    start: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    stop: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    status: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = None
    timeout: Seconds = 60.0


class VolumeTrigger(Strict, frozen=True):
    """Start once `requests` requests that would have gone to the backend arrive within `window` seconds."""

    requests: PositiveInt = 10
    window: LongSeconds = 600.0


class Triggers(Strict, frozen=True):
    # A request routed here by a rule that matched on keywords starts the backend at once.
    keywords: bool = True
    volume: VolumeTrigger | None = VolumeTrigger()


class OnDemand(Strict, frozen=True):
    actuator: DockerActuator | CommandActuator
    triggers: Triggers = Triggers()
    idle_stop: LongSeconds = 1800.0  # stop after this long without requests (seed: 30 minutes)
    min_uptime: LongSeconds = 300.0  # never idle-stopped sooner after becoming ready
    cooldown: LongSeconds = 60.0  # no new start this soon after a stop (no flapping)
    start_timeout: LongSeconds = 600.0  # until /health and /v1/models answer (vLLM loads weights)
    # While it starts: `wait` holds the request (bounded: max_waiting requests, max_wait seconds),
    # `fallback` answers from the rule's fallback now and starts in the background.
    cold_start: Literal["wait", "fallback"] = "fallback"
    max_wait: LongSeconds = 120.0
    max_waiting: Annotated[int, Meta(ge=0, le=10000)] = 64
    drain_timeout: LongSeconds = 120.0  # a stop lets in-flight requests (streams) finish this long
    # When the GPU budget is short, idle on-demand backends of lower priority are stopped first.
    priority: int = 0
    backoff: LongSeconds = 30.0  # after a failed start; doubles per failure
    backoff_max: LongSeconds = 1800.0


class Scale(Strict, frozen=True):
    backends: dict[Name, OnDemand] = {}


# --- the set of files ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policies:
    directory: Path
    catalog: Catalog
    routing: Routing
    rag: Rag = Rag()
    scale: Scale = Scale()


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    file: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyError(Exception):
    """One or more problems in the policy files; ``str()`` lists them, one per line."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_policies(directory: str | Path) -> Policies:
    """Read, validate and cross-check every policy file in ``directory``."""
    directory = Path(directory)
    problems: list[PolicyProblem] = []
    catalog_src, catalog = _load_file(directory / BACKENDS_FILE, Catalog, problems)
    routing_src, routing = _load_file(directory / ROUTING_FILE, Routing, problems)
    if catalog is not None and catalog_src is not None:
        problems += _check_catalog(catalog_src, catalog)
    if catalog is not None and routing is not None and routing_src is not None:
        problems += _check_routing(routing_src, routing, catalog)
    rag = Rag()
    if (directory / RAG_FILE).exists():
        rag_src, loaded = _load_file(directory / RAG_FILE, Rag, problems)
        if loaded is not None and rag_src is not None:
            rag = loaded
            problems += _check_rag(rag_src, rag, catalog, routing)
    scale = Scale()
    if (directory / SCALE_FILE).exists():
        scale_src, loaded_scale = _load_file(directory / SCALE_FILE, Scale, problems)
        if loaded_scale is not None and scale_src is not None:
            scale = loaded_scale
            problems += _check_scale(scale_src, scale, catalog)
    if problems:
        raise PolicyError(problems)
    assert catalog is not None and routing is not None
    return Policies(directory=directory, catalog=catalog, routing=routing, rag=rag, scale=scale)


def _load_file(
    file: Path, schema: type[T], problems: list[PolicyProblem]
) -> tuple[YamlSource | None, T | None]:
    if not file.is_file():
        problems.append(PolicyProblem(file, None, "", "file not found"))
        return None, None
    try:
        source = load_yaml(file)
    except YamlSyntaxError as exc:
        problems.append(PolicyProblem(exc.file, exc.line, "", exc.message))
        return None, None
    if not isinstance(source.data, dict):
        problems.append(PolicyProblem(file, source.line_of(()), "", "expected a mapping at the top level"))
        return source, None
    try:
        return source, msgspec.convert(source.data, schema, strict=True)
    except msgspec.ValidationError as exc:
        problems.append(_validation_problem(source, schema, str(exc)))
        return source, None


_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_ANY_KEY = "..."  # msgspec's path names a dict value as [...], without its key


def _validation_problem(source: YamlSource, schema: type, text: str) -> PolicyProblem:
    """Turn msgspec's "Expected `int`, got `str` - at `$.a[...].b`" into file, line and field."""
    parsed = _AT_PATH.match(text)
    assert parsed is not None  # the pattern matches any string
    message, raw_path = parsed["message"], parsed["path"] or "$"
    path: list[PathKey] = [
        name if name else (_ANY_KEY if index == _ANY_KEY else int(index))
        for name, index in _PATH_PART.findall(raw_path[1:])
    ]
    if _ANY_KEY in path:
        path = _resolve_dict_keys(source.data, schema, path, text)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        # Point at the misspelt key itself, not at the mapping that holds it.
        path.append(unknown[1])
        message = f"unknown field {unknown[1]!r}"
    return PolicyProblem(source.file, source.line_of(tuple(path)), _field_name(path), message)


def _resolve_dict_keys(data: object, schema: type, path: list[PathKey], error: str) -> list[PathKey]:
    """Find which key each [...] stands for: narrow that mapping to one entry at a time and
    keep the entry that reproduces the same error."""
    resolved = list(path)
    for position, part in enumerate(path):
        if part != _ANY_KEY:
            continue
        mapping = _get(data, resolved[:position])
        if not isinstance(mapping, dict):
            break
        for key in mapping:
            narrowed = _replace(data, resolved[:position], {key: mapping[key]})
            try:
                msgspec.convert(narrowed, schema, strict=True)
            except msgspec.ValidationError as exc:
                if str(exc) == error:
                    resolved[position] = key
                    data = narrowed
                    break
    return [part for part in resolved if part != _ANY_KEY]  # drop any [...] left unresolved


def _get(data: object, path: list[PathKey]) -> object:
    for part in path:
        data = data[part]  # type: ignore[index]
    return data


def _replace(data: object, path: list[PathKey], value: object) -> object:
    """A copy of ``data`` with the value at ``path`` replaced (copying only along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, head: _replace(data[head], rest, value)}
    assert isinstance(data, list) and isinstance(head, int)
    copy = list(data)
    copy[head] = _replace(data[head], rest, value)
    return copy


def _field_name(path: list[PathKey] | tuple[PathKey, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _problem(source: YamlSource, path: tuple[PathKey, ...], message: str) -> PolicyProblem:
    return PolicyProblem(source.file, source.line_of(path), _field_name(path), message)


def _check_catalog(source: YamlSource, catalog: Catalog) -> list[PolicyProblem]:
    problems: list[PolicyProblem] = []
    model_owner: dict[str, str] = {}
    for name, backend in catalog.backends.items():
        at = ("backends", name)
        if backend.url is None and backend.url_env is None:
            problems.append(_problem(source, at, "needs `url` or `url_env`"))
        if backend.url is not None:
            parts = urlsplit(backend.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(_problem(source, (*at, "url"), f"not an http(s) URL: {backend.url!r}"))
            elif parts.path not in ("", "/") or parts.query:
                problems.append(
                    _problem(source, (*at, "url"), "give the server's base URL without a path (the proxy adds /v1/...)")
                )
        if backend.model in model_owner:
            problems.append(
                _problem(source, (*at, "model"),
                         f"model id {backend.model!r} is already served by {model_owner[backend.model]!r}")
            )
        model_owner.setdefault(backend.model, name)
        if backend.model in catalog.backends and backend.model != name:
            problems.append(_problem(source, (*at, "model"), f"model id {backend.model!r} is also a backend name"))
        if backend.host is not None and backend.host not in catalog.hosts:
            problems.append(
                _problem(source, (*at, "host"), f"unknown host {backend.host!r} (known: {_known(catalog.hosts)})")
            )
        if backend.latency_target not in LATENCY_BUCKETS:
            buckets = ", ".join(f"{b:g}" for b in LATENCY_BUCKETS)
            problems.append(_problem(source, (*at, "latency_target"),
                                     f"must be one of the latency histogram's buckets: {buckets}"))
        if (backend.host is None) != (backend.gpu_memory_utilization is None):
            problems.append(_problem(source, at, "`host` and `gpu_memory_utilization` go together"))
    problems += _check_gpu_budget(source, catalog)
    return problems


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


def _check_gpu_budget(source: YamlSource, catalog: Catalog) -> list[PolicyProblem]:
    """Every host's memory plan must fit: otherwise the always-on set oversubscribes the
    card, or some on-demand backend could never be started."""
    problems: list[PolicyProblem] = []
    for host_name in catalog.hosts:
        for backend, message in memory_plan(catalog, host_name).problems():
            at = ("hosts", host_name) if backend is None else ("backends", backend, "gpu_memory_utilization")
            problems.append(_problem(source, at, message))
    return problems


def _check_routing(source: YamlSource, routing: Routing, catalog: Catalog) -> list[PolicyProblem]:
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


def _check_rag(source: YamlSource, rag: Rag, catalog: Catalog | None, routing: Routing | None) -> list[PolicyProblem]:
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


def _check_scale(source: YamlSource, scale: Scale, catalog: Catalog | None) -> list[PolicyProblem]:
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
    import string

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
