"""The policy schema: one typed definition of every file in ``policies/`` (msgspec Structs).

Both the proxy and ``infra/`` read policies through :func:`dreamseed.policy.load_policies`, so
the backend catalog's ports, models and limits mean the same thing everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from msgspec import Meta, Struct

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


class BackendTimeouts(Strict, frozen=True):
    """`read`: the longest silence between two chunks of an answer. `first_byte`: how long the
    backend may take to start answering (its response head); one that has not started by then is
    skipped along the fallback chain, so a hung backend costs seconds, not the read timeout. vLLM
    sends the head at once for a stream but only when done for a non-streamed answer: keep
    `first_byte` above the longest non-streamed generation. Unset, it is the read timeout."""

    connect: Seconds = 5.0
    read: Seconds = 60.0
    write: Seconds = 30.0
    pool: Seconds = 10.0
    first_byte: Seconds | None = None


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
    # Memory of ONE of the host's GPUs, in GiB as nvidia-smi reports it (an RTX 5090: 32,607 MiB = 31.8).
    gpu_memory_gb: Annotated[float, Meta(gt=0)]
    gpu_count: PositiveInt = 1
    # Share of each GPU kept free of every plan (the desktop, other processes).
    headroom: Annotated[float, Meta(ge=0, lt=1)] = 0.05
    # What each vLLM process holds OUTSIDE its --gpu-memory-utilization share: its CUDA context
    # and CUDA graphs (vLLM RFC #27951: 0.5-1 GiB).
    process_overhead_gib: Annotated[float, Meta(ge=0)] = 1.0
    description: str = ""
    # How the `local` stack reaches this host's Docker engine when it is not the stack's own host
    # (`ssh://user@host` or `tcp://host:2376`, as pulumi-docker's provider takes it): the replicas
    # placed on it get their vLLM containers there.
    docker: str | None = None


WeightsDtype = Literal["bf16", "fp16", "fp32", "fp8", "int8", "int4"]


class ModelMemory(Strict, frozen=True):
    """What a model's vLLM process needs on the GPU, for the memory plan (policy/capacity.py)."""

    # The checkpoint's weights as stored (the sum of its safetensors files), in GiB, and their precision.
    weights_gib: Annotated[float, Meta(gt=0)]
    weights_dtype: WeightsDtype
    # KV cache per token in 16-bit, in KiB (layers x KV heads x head size x 2 x 2 bytes); a
    # `--kv-cache-dtype fp8` among the backend's args halves it.
    kv_cache_kib_per_token: Annotated[float, Meta(gt=0)]
    # Peak of the activations in vLLM's profiling forward pass, inside the share.
    activations_gib: Annotated[float, Meta(ge=0)] = 1.0


class Replica(Strict, frozen=True):
    """One server of a backend that runs on several (the same model, the same settings)."""

    url: str | None = None
    url_env: EnvVar | None = None
    host: Name | None = None  # which GPU host runs it: its memory plan, and infra's containers

    def resolve_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The base URL to use now: ``url_env`` when set in the environment, else ``url``."""
        if self.url_env and environ.get(self.url_env):
            return environ[self.url_env].rstrip("/")
        return self.url.rstrip("/") if self.url else None


# How a request picks one of a backend's replicas (balancing.py): in turn, the least loaded, or the
# replica that served the same conversation start (its prompt cache holds it), within a load bound.
Balance = Literal["round_robin", "least_loaded", "prefix_affinity"]


class Backend(Strict, frozen=True):
    model: Annotated[str, Meta(min_length=1)]
    context_length: PositiveInt
    url: str | None = None
    url_env: EnvVar | None = None
    # Several servers of this backend instead of `url`/`url_env`/`host`: each with its own slots
    # (max_concurrency each), circuit and health checks; a request fails over between them before
    # the rule's fallback chain moves on.
    replicas: Annotated[list[Replica], Meta(min_length=1)] | None = None
    balance: Balance = "prefix_affinity"
    # prefix_affinity's bound: a replica takes a request for its conversation while its requests in
    # flight stay within this factor of the replicas' mean (consistent hashing with bounded loads).
    balance_load_factor: Annotated[float, Meta(ge=1.0, le=10.0)] = 1.25
    # `dns`: the replicas are the addresses the URL's host name resolves to, looked up again every
    # `discover_interval` seconds (a Kubernetes headless Service: one address per ready pod).
    discover: Literal["none", "dns"] = "none"
    discover_interval: Annotated[float, Meta(ge=1.0, le=3600.0)] = 10.0
    api_key_env: EnvVar | None = None
    max_concurrency: PositiveInt = 16
    # Requests that may wait for a free slot beyond max_concurrency (for up to timeouts.pool);
    # more are refused at once with 429, so a flood cannot grow the proxy's memory.
    max_queue: Annotated[int, Meta(ge=0)] = 64
    timeouts: BackendTimeouts = BackendTimeouts()
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
    # The Hugging Face repository vLLM loads when it is not `model` itself (a pre-quantized build of
    # it); vLLM serves it under `model` (--served-model-name), so clients never see the difference.
    checkpoint: str | None = None
    memory: ModelMemory | None = None
    image: str | None = None
    args: list[str] = []
    description: str = ""

    def resolve_url(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The base URL to use now: ``url_env`` when set in the environment, else ``url``."""
        if self.url_env and environ.get(self.url_env):
            return environ[self.url_env].rstrip("/")
        return self.url.rstrip("/") if self.url else None

    def replica_list(self) -> list[Replica]:
        """The backend's servers: its `replicas`, or the one its `url`, `url_env` and `host` name."""
        return list(self.replicas) if self.replicas else [Replica(url=self.url, url_env=self.url_env, host=self.host)]

    def hosts(self) -> list[str]:
        """The GPU hosts its replicas run on, each once, in order."""
        return list(dict.fromkeys(r.host for r in self.replica_list() if r.host is not None))


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


class EmbedderPolicy(Strict, frozen=True):
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
    # Languages the model embeds meaningfully (a query with Hangul in it is Korean, others
    # English). In `hybrid` mode a query in another language skips the vector leg: all-MiniLM-L6-v2
    # gives Korean text near-random neighbours, which only push the lexical leg's good hits down.
    languages: Annotated[tuple[Literal["en", "ko"], ...], Meta(min_length=1)] = ("en",)
    # Queries are embedded from at most this many tokens (longer ones: their beginning and end):
    # embedding time grows with the tokens, and the lexical leg still reads all of the message.
    max_query_tokens: Annotated[int, Meta(ge=8, le=32768)] = 32
    url: str | None = None
    url_env: EnvVar | None = None
    api_key_env: EnvVar | None = None
    # Texts per model run. Small batches keep ONNX Runtime's memory arena small (it grows to the
    # largest batch x length it has run) at about the same speed on CPU: 8 x 256 tokens.
    batch_size: Annotated[int, Meta(gt=0, le=1024)] = 8
    # The model's maximum sequence length (all-MiniLM-L6-v2: 256). Text embedded for retrieval
    # and ingestion is cut there; /v1/embeddings refuses a longer input with 400, as OpenAI does.
    max_input_tokens: Annotated[int, Meta(gt=0, le=32768)] = 256
    # Tokens one /v1/embeddings request may ask for in all, so one request's work is bounded.
    max_request_tokens: Annotated[int, Meta(gt=0, le=10_000_000)] = 8192
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
    # The lexical leg's bounds (benchmarks/README.md has the measurements). Terms in more than
    # this share of the chunks say next to nothing and are left out...
    max_term_frequency: Annotated[float, Meta(gt=0, le=1)] = 0.25
    # ...the query's rarest terms are looked up while the rows they are expected to match (from
    # Postgres's statistics) add up to at most this...
    lexical_rows: Annotated[int, Meta(ge=10, le=1_000_000)] = 1000
    # ...and no term reads more than this many rows, whatever the statistics said.
    rows_per_term: Annotated[int, Meta(ge=10, le=100000)] = 1000


class Augmentation(Strict, frozen=True):
    """Retrieval settings for a request. Every field is optional here; `defaults` fills the
    gaps, then `backends.<target>`, then `rules.<rule>` (the most specific wins)."""

    enabled: bool | None = None
    collection: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    mode: RetrievalMode | None = None
    top_k: Annotated[int, Meta(ge=1, le=50)] | None = None
    # Lowest cosine similarity a vector hit needs (lexical hits have their own threshold).
    min_similarity: Annotated[float, Meta(ge=-1, le=1)] | None = None
    # Share of the query's term weight (inverse document frequencies of the query's terms that
    # the collection holds) a chunk must contain to be a lexical hit.
    min_term_match: Annotated[float, Meta(ge=0, le=1)] | None = None
    # Weight of the lexical leg's ranks in hybrid fusion (the vector leg's is 1).
    lexical_weight: Annotated[float, Meta(ge=0, le=10)] | None = None
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
    min_term_match: float
    lexical_weight: float
    max_context_chars: int
    template: str


RAG_DEFAULTS = RagSettings(enabled=False, collection="default", mode="hybrid", top_k=4, min_similarity=0.4,
                           min_term_match=0.7, lexical_weight=1.0, max_context_chars=4000, template=DEFAULT_TEMPLATE)


class Rag(Strict, frozen=True):
    embedder: EmbedderPolicy = EmbedderPolicy()
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


class KubernetesActuator(Strict, frozen=True, tag_field="kind", tag="kubernetes"):
    """Scale a Deployment between 0 and `replicas` through the Kubernetes API's `deployments/scale`
    subresource, as the proxy's service account (the `k8s` stack gives it a Role for exactly that)."""

    deployment: Annotated[str, Meta(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    namespace: Annotated[str, Meta(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")] | None = None  # default: the proxy's
    replicas: PositiveInt = 1


class VolumeTrigger(Strict, frozen=True):
    """Start once `requests` requests that would have gone to the backend arrive within `window` seconds."""

    requests: PositiveInt = 10
    window: LongSeconds = 600.0


class Triggers(Strict, frozen=True):
    # A request routed here by a rule that matched on keywords starts the backend at once.
    keywords: bool = True
    volume: VolumeTrigger | None = VolumeTrigger()


class OnDemand(Strict, frozen=True):
    actuator: DockerActuator | CommandActuator | KubernetesActuator
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


