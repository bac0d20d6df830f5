"""RAG retrieval speed and HNSW quality, through the product's own code (FastEmbedder,
DocumentStore.search in `vector` mode, the schema `ensure_schema` creates) on an embedded
PostgreSQL+pgvector.

Data: generated support-style sentences, embedded by all-MiniLM-L6-v2. Embedding 100k texts
would take minutes on 2 cores, so the corpus is a set of really embedded base texts (2k in short
mode, 10k in full) plus perturbed copies of their vectors (Gaussian noise, sigma 0.03 per
dimension, renormalised: cosine about 0.85 to the original), which keeps the distribution of real
embeddings at any size. Queries are other generated sentences, embedded for real.

Reported (extra_info): query embedding P50/P95; retrieval (embed + HNSW top-10 in SQL) P50/P95 at
10k and, in full mode, 100k chunks; recall@10 of the HNSW scan against exact search (the same
query with index scans off) on the same data; index build time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest

from conftest import MODE
from dreamseed.policy import EmbedderPolicy, VectorStore
from dreamseed.rag.database import open_database
from dreamseed.rag.embedders import FastEmbedder
from dreamseed.rag.store import DocumentStore, ensure_schema, open_pool
from support import rag_model_dir

SUBJECTS = ["the proxy", "a vLLM backend", "the coder model", "Postgres", "the router", "an operator", "the 70B host",
            "Grafana", "the scaler", "a client", "the billing service", "the embedding server"]
VERBS = ["restarts", "streams tokens to", "rejects", "routes requests to", "monitors", "caches", "times out on",
         "retries", "throttles", "authenticates", "logs", "drains"]
OBJECTS = ["the GPU queue", "long prompts", "Korean keywords", "API keys", "health checks", "the embedding table",
           "SSE chunks", "billing invoices", "rate limits", "policy files", "on-demand backends", "support tickets"]
CONTEXTS = ["during peak hours", "after a deploy", "when memory is low", "on the weekend", "behind the load balancer",
            "in the staging cluster", "for the support team", "under 16 concurrent users", "while a reload runs"]
QUERIES = 200 if MODE == "full" else 100


def sentence(rng: random.Random, i: int) -> str:
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CONTEXTS)}; "
            f"ticket {i}: {rng.choice(OBJECTS)} and {rng.choice(SUBJECTS)}.")


@dataclass
class RagBench:
    embedder: FastEmbedder
    url: str
    base: np.ndarray
    queries: list[str]


@pytest.fixture(scope="module")
def rag_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagBench]:
    embedder = FastEmbedder(EmbedderPolicy(model_path=str(rag_model_dir())), {})
    rng = random.Random(20261124)
    base_count = 10_000 if MODE == "full" else 2_000
    base = embedder.embed([sentence(rng, i) for i in range(base_count)])
    queries = [f"how does {rng.choice(SUBJECTS)} handle {rng.choice(OBJECTS)} {rng.choice(CONTEXTS)}?"
               for _ in range(QUERIES)]
    database = open_database({"DREAMSEED_STATE_DIR": str(tmp_path_factory.mktemp("rag-bench"))})
    try:
        yield RagBench(embedder, database.url, base, queries)
    finally:
        database.stop()


def corpus(base: np.ndarray, size: int) -> np.ndarray:
    noise = np.random.default_rng(size)
    copies = [base] + [base + noise.normal(0, 0.03, base.shape).astype(np.float32)
                       for _ in range(size // len(base) - 1)]
    vectors = np.concatenate(copies)[:size]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def load(url: str, store: VectorStore, vectors: np.ndarray) -> float:
    """Fill the store's table (created by the product's schema code); returns the HNSW build seconds."""
    from pgvector.psycopg import register_vector

    async def schema() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await ensure_schema(conn, store, "bench", vectors.shape[1])

    asyncio.run(schema())
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        hnsw = f"{store.table}_embedding_hnsw"
        conn.execute(f"DROP INDEX {hnsw}")  # load first, index after: how a bulk load is done
        with conn.cursor().copy(f"COPY {store.table} (collection, source, chunk_index, content, content_sha256, "
                                "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "int4", "text", "text", "vector"])
            for index, vector in enumerate(vectors):
                copy.write_row(("bench", f"doc{index // 4}", index % 4, f"chunk {index}", f"{index:064x}", vector))
        conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {hnsw} ON {store.table} USING hnsw (embedding vector_cosine_ops) "
                     f"WITH (m = {store.hnsw_m}, ef_construction = {store.hnsw_ef_construction})")
        built = time.perf_counter() - started
        conn.execute(f"VACUUM ANALYZE {store.table}")
    return built


def exact_top10(url: str, table: str, vectors: np.ndarray) -> list[list[int]]:
    from pgvector.psycopg import register_vector

    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("SET enable_indexscan = off")  # a sequential scan: the true nearest neighbours
        return [[row[0] for row in conn.execute(
            f"SELECT id FROM {table} WHERE collection = 'bench' ORDER BY embedding <=> %s LIMIT 10", (v,))]
            for v in vectors]


def measure(bench: RagBench, store: VectorStore) -> dict[str, Any]:
    async def run() -> tuple[list[float], list[list[int]]]:
        pool = open_pool(bench.url, store)
        await pool.open(wait=True)
        documents = DocumentStore(pool, store)
        try:
            for query in bench.queries[:10]:  # warm the buffers and the pool, as a running proxy is
                await documents.search("bench", text=query, vector=bench.embedder.embed([query])[0], mode="vector",
                                       top_k=10, min_similarity=-1)
            latencies, found = [], []
            for query in bench.queries:
                started = time.perf_counter()
                vector = bench.embedder.embed([query])[0]
                hits = await documents.search("bench", text=query, vector=vector, mode="vector", top_k=10,
                                              min_similarity=-1)
                latencies.append(time.perf_counter() - started)
                found.append([hit.id for hit in hits])
            return latencies, found
        finally:
            await pool.close()

    latencies, found = asyncio.run(run())
    truth = exact_top10(bench.url, store.table, bench.embedder.embed(bench.queries))
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "recall_at_10": recall, "queries": len(ms), "ef_search": store.ef_search}


def test_query_embedding(benchmark, rag_bench: RagBench) -> None:  # type: ignore[no-untyped-def]
    queries = iter(rag_bench.queries * 1000)
    benchmark.pedantic(lambda: rag_bench.embedder.embed([next(queries)]), rounds=QUERIES, iterations=1,
                       warmup_rounds=5)
    data = np.array(benchmark.stats.stats.data) * 1e3
    benchmark.extra_info.update({"p50_ms": float(np.percentile(data, 50)), "p95_ms": float(np.percentile(data, 95))})


@pytest.mark.parametrize("chunks", [10_000, 100_000], ids=["10k", "100k"])
def test_retrieval(benchmark, rag_bench: RagBench, chunks: int) -> None:  # type: ignore[no-untyped-def]
    if chunks > 10_000 and MODE != "full":
        pytest.skip("100k chunks in full mode only (a minute of loading and indexing)")
    store = VectorStore(table=f"bench_{chunks}")
    build_s = load(rag_bench.url, store, corpus(rag_bench.base, chunks))
    result = benchmark.pedantic(lambda: measure(rag_bench, store), rounds=1, iterations=1)
    benchmark.extra_info.update({**result, "chunks": chunks, "hnsw_build_s": build_s})
