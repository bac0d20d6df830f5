"""The documents table in Postgres/pgvector, and the SQL that searches it.

One table per embedding model (``store.table`` in rag.yaml, default ``documents``), created
idempotently at start. A side table records which model and dimension filled it: opening
a table with another model's settings is an error, because mixing vector spaces gives
silently wrong answers.

Retrieval is one SQL statement per request, made of up to three legs fused by reciprocal
rank fusion (score = sum of 1 / (60 + rank) over the legs that found a chunk):
  vector    HNSW scan on cosine distance (pgvector), hits under `min_similarity` dropped
  full-text tsvector (`english` config: stems English, keeps Korean words whole), OR-query
  trigram   pg_trgm word similarity of the query inside a chunk: finds Korean words with
            particles attached (비밀번호를 ~ 비밀번호), which neither MiniLM nor full-text can
Mode `vector` uses the first leg, `lexical` the other two, `hybrid` all three.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..policy import RetrievalMode, VectorStore

RRF_K = 60  # the constant from Cormack et al. (2009), used by most hybrid search engines
TEXT_SEARCH_CONFIG = "english"
SCHEMA_LOCK = 0x445353  # pg_advisory lock key: two processes creating the schema at once


class StoreMismatchError(Exception):
    """The table exists but was built for another model or dimension."""


@dataclass(frozen=True, slots=True)
class Chunk:
    source: str
    index: int
    content: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = field(init=False)  # the dedupe key, hashed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.content.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    source: str
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    score: float  # fused score (higher is better)
    similarity: float | None  # cosine similarity to the query, when a vector was used


def _names(table: str) -> dict[str, sql.Identifier]:
    return {
        "table": sql.Identifier(table),
        "hnsw": sql.Identifier(f"{table}_embedding_hnsw"),
        "fts": sql.Identifier(f"{table}_tsv_gin"),
        "trgm": sql.Identifier(f"{table}_content_trgm"),
        "by_source": sql.Identifier(f"{table}_collection_source"),
    }


async def ensure_schema(conn: psycopg.AsyncConnection[Any], store: VectorStore, model: str, dim: int) -> None:
    """Create extensions, table and indexes if missing; refuse a table built for another model."""
    names = _names(store.table)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS dreamseed_rag_tables ("
            " table_name text PRIMARY KEY, model text NOT NULL, dim integer NOT NULL,"
            " text_search_config text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        row = await (await conn.execute(
            "SELECT model, dim, text_search_config FROM dreamseed_rag_tables WHERE table_name = %s",
            (store.table,))).fetchone()
        column = await (await conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attname = 'embedding'", (store.table,))).fetchone()
        if column is not None and column[0] != f"vector({dim})":
            raise StoreMismatchError(
                f"table {store.table!r} holds {column[0]} embeddings, but the configured model {model} makes "
                f"vector({dim}): set store.table in rag.yaml to a new table, or delete and re-ingest")
        if row is not None and (row[0] != model or row[1] != dim):
            raise StoreMismatchError(
                f"table {store.table!r} was filled by {row[0]} ({row[1]}-d vectors); the configured model is {model} "
                f"({dim}-d): vectors of two models cannot be compared. Set store.table in rag.yaml to a new table, "
                "or delete the collection and re-ingest")
        await conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {table} ("
            " id bigserial PRIMARY KEY,"
            " collection text NOT NULL,"
            " source text NOT NULL,"
            " chunk_index integer NOT NULL,"
            " content text NOT NULL,"
            " content_sha256 text NOT NULL,"
            " metadata jsonb NOT NULL DEFAULT '{{}}'::jsonb,"
            " embedding vector({dim}) NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " tsv tsvector GENERATED ALWAYS AS (to_tsvector({config}, content)) STORED,"
            " UNIQUE (collection, content_sha256))").format(
                dim=sql.Literal(dim), config=sql.Literal(TEXT_SEARCH_CONFIG), **names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {hnsw} ON {table} USING hnsw (embedding vector_cosine_ops)"
            " WITH (m = {m}, ef_construction = {ef})").format(
                m=sql.Literal(store.hnsw_m), ef=sql.Literal(store.hnsw_ef_construction), **names))
        await conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {fts} ON {table} USING gin (tsv)").format(**names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {trgm} ON {table} USING gin (content gin_trgm_ops)").format(**names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {by_source} ON {table} (collection, source)").format(**names))
        if row is None:
            await conn.execute(
                "INSERT INTO dreamseed_rag_tables (table_name, model, dim, text_search_config) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (table_name) DO NOTHING", (store.table, model, dim, TEXT_SEARCH_CONFIG))


async def configure_connection(conn: psycopg.AsyncConnection[Any], store: VectorStore) -> None:
    """Per-connection settings: the pgvector adapter and the HNSW search knobs."""
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)
    await conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(store.ef_search),))
    await conn.execute("SELECT set_config('hnsw.iterative_scan', %s, false)", (store.iterative_scan,))
    await conn.commit()


def open_pool(url: str, store: VectorStore, *, max_size: int = 8, timeout: float = 5.0) -> AsyncConnectionPool:
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await configure_connection(conn, store)

    return AsyncConnectionPool(url, min_size=1, max_size=max_size, timeout=timeout, configure=configure, open=False,
                               name="dreamseed-rag", reconnect_timeout=60)


class DocumentStore:
    def __init__(self, pool: AsyncConnectionPool, store: VectorStore) -> None:
        self.pool = pool
        self.store = store
        self._names = _names(store.table)

    async def existing_hashes(self, collection: str, hashes: Sequence[str]) -> set[str]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(sql.SQL(
                "SELECT content_sha256 FROM {table} WHERE collection = %s AND content_sha256 = ANY(%s)").format(
                    **self._names), (collection, list(hashes)))).fetchall()
        return {row[0] for row in rows}

    async def replace_source(self, collection: str, source: str, keep: Sequence[str], chunks: Sequence[Chunk],
                             vectors: np.ndarray | None) -> tuple[int, int]:
        """Synchronise ``source`` in ``collection``: its stored chunks whose hash is not in ``keep``
        (stale parts of an edited file) go; ``chunks`` come in, ``vectors`` giving their
        embeddings row for row. Returns (added, removed)."""
        keep = list(keep)
        async with self.pool.connection() as conn, conn.transaction():
            removed = await conn.execute(sql.SQL(
                "DELETE FROM {table} WHERE collection = %s AND source = %s AND NOT (content_sha256 = ANY(%s))").format(
                    **self._names), (collection, source, keep))
            added = 0
            if chunks:
                assert vectors is not None and len(vectors) == len(chunks)
                async with conn.cursor() as cursor:
                    await cursor.executemany(sql.SQL(
                        "INSERT INTO {table} (collection, source, chunk_index, content, content_sha256, metadata, embedding)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (collection, content_sha256) DO NOTHING"
                        " RETURNING id").format(**self._names),
                        [(collection, chunk.source, chunk.index, chunk.content, chunk.sha256,
                          json.dumps(chunk.metadata, ensure_ascii=False), vector)
                         for chunk, vector in zip(chunks, vectors, strict=True)], returning=True)
                    while True:
                        added += len(await cursor.fetchall())
                        if not cursor.nextset():
                            break
        return added, removed.rowcount

    async def delete(self, collection: str | None = None, source: str | None = None) -> int:
        if collection is None and source is None:
            raise ValueError("name a collection, a source, or both")
        conditions, params = [], []
        if collection is not None:
            conditions.append(sql.SQL("collection = %s"))
            params.append(collection)
        if source is not None:
            conditions.append(sql.SQL("source = %s"))
            params.append(source)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(sql.SQL("DELETE FROM {table} WHERE {where}").format(
                where=sql.SQL(" AND ").join(conditions), **self._names), params)
            return cursor.rowcount

    async def collections(self) -> dict[str, dict[str, int]]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(sql.SQL(
                "SELECT collection, count(DISTINCT source), count(*) FROM {table} GROUP BY collection ORDER BY 1").format(
                    **self._names))).fetchall()
        return {row[0]: {"sources": row[1], "chunks": row[2]} for row in rows}

    async def search(self, collection: str, *, text: str, vector: np.ndarray | None, mode: RetrievalMode,
                     top_k: int, min_similarity: float = -1.0, min_word_similarity: float = 0.3) -> list[Hit]:
        use_vector = mode in ("vector", "hybrid") and vector is not None
        use_lexical = mode in ("lexical", "hybrid")
        candidates = max(4 * top_k, 20)
        legs: list[sql.Composable] = []
        ctes: list[sql.SQL] = []
        params: dict[str, Any] = {"c": collection, "n": candidates, "k": top_k, "q": vector, "text": text,
                                  "min_sim": min_similarity, "rrf": RRF_K}
        if use_vector:
            ctes.append(sql.SQL(
                "vec AS (SELECT id, row_number() OVER (ORDER BY distance) AS rank FROM ("
                " SELECT id, embedding <=> %(q)s AS distance FROM {table} WHERE collection = %(c)s"
                " ORDER BY embedding <=> %(q)s LIMIT %(n)s) nearest WHERE 1 - distance >= %(min_sim)s)"))
            legs.append(sql.SQL("SELECT id, rank FROM vec"))
        if use_lexical:
            ctes.append(sql.SQL(
                "fts AS (SELECT id, row_number() OVER (ORDER BY ts_rank_cd(tsv, query) DESC, id) AS rank"
                # Any of the query's lexemes (plainto_tsquery would demand all of them).
                " FROM {table}, (SELECT replace(plainto_tsquery({config}, %(text)s)::text, ' & ', ' | ') AS q) raw,"
                " LATERAL (SELECT CASE WHEN raw.q = '' THEN NULL ELSE raw.q::tsquery END AS query) parsed"
                " WHERE collection = %(c)s AND tsv @@ query ORDER BY ts_rank_cd(tsv, query) DESC, id LIMIT %(n)s)"))
            ctes.append(sql.SQL(
                "trgm AS (SELECT id, row_number() OVER (ORDER BY word_similarity(%(text)s, content) DESC, id) AS rank"
                " FROM {table} WHERE collection = %(c)s AND %(text)s <%% content"
                " ORDER BY word_similarity(%(text)s, content) DESC, id LIMIT %(n)s)"))
            legs += [sql.SQL("SELECT id, rank FROM fts"), sql.SQL("SELECT id, rank FROM trgm")]
        if not legs:
            return []
        similarity = sql.SQL("1 - (d.embedding <=> %(q)s)") if vector is not None else sql.SQL("NULL::float8")
        query = sql.SQL(
            "WITH {ctes}, fused AS (SELECT id, sum(1.0 / (%(rrf)s + rank)) AS score FROM ({legs}) found GROUP BY id)"
            " SELECT d.id, d.source, d.chunk_index, d.content, d.metadata, f.score::float8, {similarity}"
            " FROM fused f JOIN {table} d USING (id) ORDER BY f.score DESC, d.id LIMIT %(k)s").format(
                ctes=sql.SQL(", ").join(
                    [cte.format(config=sql.Literal(TEXT_SEARCH_CONFIG), **self._names) for cte in ctes]),
                legs=sql.SQL(" UNION ALL ").join(legs), similarity=similarity, **self._names)
        async with self.pool.connection() as conn:
            if use_lexical:
                await conn.execute("SELECT set_config('pg_trgm.word_similarity_threshold', %s, true)",
                                   (str(min_word_similarity),))
            rows = await (await conn.execute(query, params)).fetchall()
        return [Hit(*row) for row in rows]


def hits_as_dicts(hits: Iterable[Hit]) -> list[dict[str, Any]]:
    return [{"id": h.id, "source": h.source, "chunk_index": h.chunk_index, "score": round(h.score, 6),
             "similarity": None if h.similarity is None else round(h.similarity, 4), "content": h.content,
             "metadata": h.metadata} for h in hits]
