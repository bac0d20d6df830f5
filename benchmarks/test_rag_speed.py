"""RAG speed at real size, through the product's own code: `Retriever.search` (query shortening,
language routing, the batching embedder, `DocumentStore.search`'s one SQL statement) on the
schema `ensure_schema` creates, in an embedded PostgreSQL+pgvector.

Corpus: passages of real text (benchmarks/corpus.py: Python's standard-library docstrings, and for
one chunk in ten the Korean constitution and bills), 10k chunks in short mode and 10k + 100k in full
mode. Embedding 100k passages for real would take most of an hour on 2 cores, so a base of
passages is embedded for real (500 short, 2,000 full) and the other chunks get perturbed copies
of their vectors (Gaussian noise, sigma 0.03 per dimension, renormalised: cosine about 0.85 to the
original), which keeps the distribution of real embeddings at any size; every chunk's text, which
the lexical leg reads, is its own.

Queries: English and Korean, each as three words, one sentence, and a 2,000-character chat
message. Reported (extra_info) per mode (vector, lexical, hybrid): P50/P95 of a whole retrieval
(embedding + SQL) over all queries and per query kind, and for the vector leg the HNSW recall@10
against exact search (the same query with index scans off).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest

import corpus
from dreamseed.policy import EmbedderPolicy, Rag, VectorStore
from dreamseed.rag.database import open_database
from dreamseed.rag.embedders import FastEmbedder
from dreamseed.rag.retriever import Retriever
from dreamseed.rag.store import analyze, ensure_schema
from harness import MODE, rag_model_dir

BASE = 2_000 if MODE == "full" else 500
PER_KIND = 30 if MODE == "full" else 12
MODES = ("vector", "lexical", "hybrid")
ROUNDS = 3  # each query set is timed this many times; figures are medians over the rounds


@dataclass
class RagBench:
    embedder: FastEmbedder
    url: str
    state: str
    texts: list[str]  # 100k (full) or 10k passages
    base: np.ndarray  # real embeddings of texts[:BASE]
    queries: dict[str, list[str]]


@pytest.fixture(scope="module")
def rag_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagBench]:
    english, korean = corpus.english_pool(), corpus.korean_pool()
    texts = corpus.chunks([(english, 0.9), (korean, 0.1)], 100_000 if MODE == "full" else 10_000, seed=20261130)
    embedder = FastEmbedder(EmbedderPolicy(model_path=str(rag_model_dir())), {})
    base = embedder.embed(texts[:BASE])
    queries = {**corpus.queries(english, 1, PER_KIND), **corpus.queries(korean, 2, PER_KIND)}
    state = tmp_path_factory.mktemp("rag-bench")
    database = open_database({"DREAMSEED_STATE_DIR": str(state)})
    try:
        yield RagBench(embedder, database.url, str(state), texts, base, queries)
    finally:
        database.stop()


def vectors_for(base: np.ndarray, size: int) -> np.ndarray:
    """The base's real vectors, then blends of two of them plus noise up to ``size``: a passage
    between two topics. (Plain noisy copies of a small base made clusters of near-duplicates that
    no real corpus has, and HNSW recall fell with the copies per base vector.)"""
    rng = np.random.default_rng(size)
    extra = size - len(base)
    first, second = rng.integers(0, len(base), extra), rng.integers(0, len(base), extra)
    share = rng.uniform(0.3, 0.7, (extra, 1)).astype(np.float32)
    blends = share * base[first] + (1 - share) * base[second] + rng.normal(0, 0.02, (extra, base.shape[1]))
    vectors = np.concatenate([base, blends.astype(np.float32)])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def load(url: str, store: VectorStore, texts: list[str], vectors: np.ndarray) -> dict[str, float]:
    """Fill the store's table (created by the product's schema code) the way a bulk load is done:
    rows first, indexes after, then ANALYZE (the lexical leg's term frequencies). Returns timings."""
    from pgvector.psycopg import register_vector

    async def schema() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await ensure_schema(conn, store, EmbedderPolicy().model, vectors.shape[1])  # what the retriever checks

    asyncio.run(schema())
    timings = {}
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        hnsw, gin = f"{store.table}_embedding_hnsw", f"{store.table}_terms_gin"
        conn.execute(f"DROP INDEX {hnsw}")
        conn.execute(f"DROP INDEX {gin}")
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY {store.table} (collection, source, chunk_index, content, content_sha256, "
                                "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "int4", "text", "text", "vector"])
            for index, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                copy.write_row(("bench", f"doc{index // 4}", index % 4, text, f"{index:064x}", vector))
        timings["copy_s"] = time.perf_counter() - started
        conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {hnsw} ON {store.table} USING hnsw (embedding vector_cosine_ops) "
                     f"WITH (m = {store.hnsw_m}, ef_construction = {store.hnsw_ef_construction})")
        timings["hnsw_build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute(f"CREATE INDEX {gin} ON {store.table} USING gin (terms)")
        timings["gin_build_s"] = time.perf_counter() - started
        conn.execute(f"VACUUM {store.table}")

    async def term_frequencies() -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            await analyze(conn, store.table)  # what ingestion runs: the lexical leg's term frequencies

    started = time.perf_counter()
    asyncio.run(term_frequencies())
    timings["analyze_s"] = time.perf_counter() - started
    return timings


def exact_top10(url: str, table: str, vectors: np.ndarray) -> list[list[int]]:
    from pgvector.psycopg import register_vector

    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("SET enable_indexscan = off")  # a sequential scan: the true nearest neighbours
        return [[row[0] for row in conn.execute(
            f"SELECT id FROM {table} WHERE collection = 'bench' ORDER BY embedding <=> %s LIMIT 10", (v,))]
            for v in vectors]


def measure(bench: RagBench, store: VectorStore) -> dict[str, Any]:
    rag = Rag(embedder=EmbedderPolicy(model_path=str(rag_model_dir())), store=store)
    base = dataclasses.replace(rag.settings("", ""), collection="bench", top_k=10)

    async def run() -> tuple[list[dict[str, dict[str, list[float]]]], list[list[int]]]:
        retriever = Retriever(rag, {"DATABASE_URL": bench.url, "DREAMSEED_STATE_DIR": bench.state})
        await retriever.bring_up()
        settings = {mode: dataclasses.replace(base, mode=mode) for mode in MODES}
        try:
            for query in [q for qs in bench.queries.values() for q in qs][:10]:  # warm buffers and pool
                for mode in MODES:
                    await retriever.search(settings[mode], query)
            rounds: list[dict[str, dict[str, list[float]]]] = []
            found: list[list[int]] = []
            for round_number in range(ROUNDS):
                latencies: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES}
                for kind, queries in bench.queries.items():
                    for query in queries:
                        for mode in MODES:  # interleaved: a stall of the shared machine hits every mode alike
                            started = time.perf_counter()
                            hits = await retriever.search(settings[mode], query, min_similarity=-1.0)
                            latencies[mode].setdefault(kind, []).append(time.perf_counter() - started)
                            if round_number == 0 and mode == "vector" and kind.startswith("en"):
                                found.append([hit.id for hit in hits])
                rounds.append(latencies)
            return rounds, found
        finally:
            await retriever.aclose()

    rounds, found = asyncio.run(run())
    embedding: dict[str, list[float]] = {}
    for kind, queries in bench.queries.items():  # the embedding's share, measured alone
        for query in queries:
            started = time.perf_counter()
            bench.embedder.embed([bench.embedder.shorten(query, rag.embedder.max_query_tokens)])
            embedding.setdefault(kind, []).append(time.perf_counter() - started)
    english = [q for kind, qs in bench.queries.items() if kind.startswith("en") for q in qs]
    shortened = [bench.embedder.shorten(q, rag.embedder.max_query_tokens) for q in english]
    truth = exact_top10(bench.url, store.table, bench.embedder.embed(shortened))
    result: dict[str, Any] = {"recall_at_10": float(np.mean([len(set(f) & set(t)) / 10 for f, t in
                                                             zip(found, truth, strict=True)]))}
    for kind, seconds in embedding.items():
        result[f"embedding_{kind}_p95_ms"] = float(np.percentile(np.array(seconds) * 1e3, 95))
    # Each figure is the median over the rounds of that round's percentile: a stall of the shared
    # machine moves one round, not the figure (as in test_overhead.compare).
    for mode in MODES:
        every = [np.array([s for seconds in r[mode].values() for s in seconds]) * 1e3 for r in rounds]
        result[f"{mode}_p50_ms"] = float(np.median([np.percentile(e, 50) for e in every]))
        result[f"{mode}_p95_ms"] = float(np.median([np.percentile(e, 95) for e in every]))
        for kind in rounds[0][mode]:
            result[f"{mode}_{kind}_p95_ms"] = float(np.median(
                [np.percentile(np.array(r[mode][kind]) * 1e3, 95) for r in rounds]))
    return result


def test_query_embedding(benchmark, rag_bench: RagBench) -> None:  # type: ignore[no-untyped-def]
    sentences = rag_bench.queries["en-sentence"]
    queries = iter(sentences * 1000)
    benchmark.pedantic(lambda: rag_bench.embedder.embed([next(queries)]), rounds=len(sentences) * ROUNDS,
                       iterations=1, warmup_rounds=5)
    data = np.array(benchmark.stats.stats.data) * 1e3
    # The median over ROUNDS consecutive blocks of each block's percentile: a stall of the shared
    # machine during one block moves that block, not the figure.
    blocks = np.array_split(data, ROUNDS)
    benchmark.extra_info.update({"p50_ms": float(np.median([np.percentile(b, 50) for b in blocks])),
                                 "p95_ms": float(np.median([np.percentile(b, 95) for b in blocks]))})


@pytest.mark.parametrize("chunks", [10_000, 100_000], ids=["10k", "100k"])
def test_retrieval(benchmark, rag_bench: RagBench, chunks: int) -> None:  # type: ignore[no-untyped-def]
    if chunks > len(rag_bench.texts):
        pytest.skip("100k chunks in full mode only (minutes of loading and indexing)")
    store = VectorStore(table=f"bench_{chunks}")
    timings = load(rag_bench.url, store, rag_bench.texts[:chunks], vectors_for(rag_bench.base, chunks))
    result = benchmark.pedantic(lambda: measure(rag_bench, store), rounds=1, iterations=1)
    benchmark.extra_info.update({**result, **timings, "chunks": chunks, "queries": sum(map(len, rag_bench.queries.values()))})
