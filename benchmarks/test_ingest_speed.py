"""Ingestion speed through the product's own pipeline (`ingest_texts`: chunking, the dedupe lookup,
length-sorted embedding in groups on the bulk thread, one transaction per group of sources written
while the next group embeds, ANALYZE) into an embedded PostgreSQL+pgvector with its live HNSW and GIN
indexes, against the model alone on the same chunks in the same run.

Documents: pages of Debian's manuals (benchmarks/corpora.py) of 1,500 to 4,000 characters, one in
ten from LibreOffice's Korean help, so chunking cuts them as it cuts real files. Reported: chunks
per second end to end, the model's own chunks per second on the same chunks (embedding only, the
same batch size), and their ratio: what the pipeline adds to the model, which is the part the code
controls.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

import corpora
from dreamseed.policy import Chunking, EmbedderPolicy, VectorStore
from dreamseed.rag.chunking import chunk_text
from dreamseed.rag.database import open_database
from dreamseed.rag.embedders import BatchingEmbedder, FastEmbedder
from dreamseed.rag.ingest import ingest_texts
from dreamseed.rag.store import DocumentStore, ensure_schema, open_pool
from harness import MODE, rag_model_dir

DOCUMENTS = 600 if MODE == "full" else 120


def test_ingestion(benchmark, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    english, korean = ([d for _, d in corpora.manuals(groups, korean=groups is corpora.KOREAN_MANUALS)
                        if 1500 <= len(d.text) <= 4000] for groups in (corpora.ENGLISH_MANUALS, corpora.KOREAN_MANUALS))
    picked = rng.sample(english, DOCUMENTS - DOCUMENTS // 10) + rng.sample(korean, DOCUMENTS // 10)
    documents = [(d.id, d.text, {}) for d in picked]
    policy = EmbedderPolicy(model_path=str(rag_model_dir()))
    embedder = FastEmbedder(policy, {})
    chunking = Chunking()
    chunks = [c for _, text, _ in documents for c in chunk_text(text, chunking.size, chunking.overlap)]

    started = time.perf_counter()  # the model alone, as ingestion feeds it (shortest first)
    embedder.embed(sorted(chunks, key=len))
    model_rate = len(chunks) / (time.perf_counter() - started)

    database = open_database({"DREAMSEED_STATE_DIR": str(tmp_path_factory.mktemp("ingest-bench"))})
    store = VectorStore(table="ingest_bench")

    async def ingest() -> float:
        import psycopg

        async with await psycopg.AsyncConnection.connect(database.url) as conn:
            await ensure_schema(conn, store, policy.model, embedder.dim)
        pool = open_pool(database.url, store)
        await pool.open(wait=True)
        batching = BatchingEmbedder(embedder, max_batch=policy.batch_size)
        try:
            summary = await ingest_texts(DocumentStore(pool, store), batching, "bench", documents, chunking)
            assert summary.added == len(set(chunks)) and not summary.errors
            return summary.chunks_per_second
        finally:
            batching.close()
            await pool.close()

    try:
        rate = benchmark.pedantic(lambda: asyncio.run(ingest()), rounds=1, iterations=1)
    finally:
        database.stop()
    benchmark.extra_info.update({"chunks": len(chunks), "chunks_per_second": rate, "model_chunks_per_second": model_rate,
                                 "pipeline_over_model": rate / model_rate,
                                 "mean_chunk_chars": sum(map(len, chunks)) / len(chunks)})
