"""The policies in ``policies/``: their schema, loading with line numbers, the cross-file
checks, and GPU capacity planning. Both the proxy and ``infra/`` read them through
:func:`load_policies`, so the backend catalog's ports, models and limits never drift.

Loading is strict: unknown fields, wrong types, dangling references and fallback cycles are
errors that name the file, the line and the field.
"""

from .capacity import BackendMemory, MemoryPlan, memory_plan
from .loading import load_catalog, load_policies
from .schema import (
    AUTO_MODEL,
    BACKENDS_FILE,
    DEFAULT_TEMPLATE,
    DIRECT_RULE,
    LATENCY_BUCKETS,
    RAG_DEFAULTS,
    RAG_FILE,
    ROUTING_FILE,
    SCALE_FILE,
    Augmentation,
    Backend,
    BackendTimeouts,
    Balance,
    Catalog,
    Chunking,
    CommandActuator,
    DockerActuator,
    EmbedderPolicy,
    GpuHost,
    HealthCheck,
    KubernetesActuator,
    Match,
    ModelMemory,
    OnDemand,
    Policies,
    PolicyError,
    PolicyProblem,
    Rag,
    RagSettings,
    Replica,
    RetrievalMode,
    Routing,
    Rule,
    Scale,
    Scope,
    Triggers,
    VectorStore,
    VolumeTrigger,
)

__all__ = [
    "AUTO_MODEL", "BACKENDS_FILE", "DEFAULT_TEMPLATE", "DIRECT_RULE", "LATENCY_BUCKETS", "RAG_DEFAULTS", "RAG_FILE",
    "ROUTING_FILE", "SCALE_FILE", "Augmentation", "Backend", "BackendMemory", "BackendTimeouts", "Balance", "Catalog",
    "Chunking", "CommandActuator", "DockerActuator", "EmbedderPolicy", "GpuHost", "HealthCheck", "KubernetesActuator", "Match",
    "MemoryPlan", "ModelMemory", "OnDemand", "Policies", "PolicyError", "PolicyProblem", "Rag", "RagSettings",
    "Replica", "RetrievalMode", "Routing", "Rule", "Scale", "Scope", "Triggers", "VectorStore", "VolumeTrigger", "load_catalog",
    "load_policies", "memory_plan",
]
