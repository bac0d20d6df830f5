"""The documents table in Postgres/pgvector, and the SQL that searches it.

One table per embedding model (``store.table`` in rag.yaml, default ``documents``), created
idempotently at start. A side table records which model and dimension filled it: opening
a table with another model's settings is an error, because mixing vector spaces gives
silently wrong answers.

Retrieval runs up to two legs, each one SQL statement on its own pooled connection (so Postgres
runs them at once), fuses their ranks by weighted reciprocal rank fusion (score = sum over the
legs that found a chunk of weight / (60 + rank), `fuse`) and fetches the winners by id:
  vector   HNSW scan on cosine distance (pgvector); hits under `min_similarity` dropped.
  lexical  the query's terms against a GIN-indexed ``terms`` tsvector: English words stemmed
           (`english` configuration) plus every Hangul syllable bigram, so 비밀번호 matches
           비밀번호를 (a particle attached) through 비밀/밀번/번호, the way CJK search engines
           index. Each term weighs its inverse document frequency, from Postgres's own statistics
           on the column (ANALYZE's most_common_elems, copied into dreamseed_rag_terms); terms in
           more than `max_term_frequency` of the chunks are left out, the rarest (at most
           MAX_QUERY_TERMS) are looked up while their expected rows fit `lexical_rows`, each reading
           at most `rows_per_term` rows, so the leg's cost is bounded whatever the corpus size or
           query length. A chunk is a lexical hit when the terms it holds weigh at least
           `min_term_match` of what the query's terms present in the collection weigh: one shared
           common word is not enough.
Mode `vector` uses the first leg, `lexical` the second, `hybrid` both.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from ..policy import RetrievalMode, VectorStore
from .language import without_particles

RRF_K = 60  # the constant from Cormack et al. (2009), used by most hybrid search engines
TEXT_SEARCH_CONFIG = "english+hangul-bigrams"
# What a chunk's (and a query's) terms are: English words stemmed, stop words out; Hangul runs
# also as syllable bigrams. IMMUTABLE, so a generated column can use it; the same function
# parses queries, so both sides always agree.
TERMS_FUNCTION = """
CREATE OR REPLACE FUNCTION dreamseed_terms(content text) RETURNS tsvector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT to_tsvector('english', content) || to_tsvector('simple', coalesce((
    SELECT string_agg(substr(run[1], i, 2), ' ')
    FROM regexp_matches(content, '([가-힣]{2,})', 'g') AS run, generate_series(1, char_length(run[1]) - 1) AS i), ''))
$$"""
# ANALYZE keeps up to 10 x this many of the column's most common terms with their frequencies:
# the lexical leg's document frequencies. 1000 tracks terms down to about 0.1% of the chunks.
TERMS_STATISTICS = 1000
# The planner cannot know at planning time which terms the lexical leg will look up, and with a row
# limit per term it may prefer reading the table in order until enough rows match: fine for a common
# term, the whole table for a rare one. Every statement the store's connections run has an index to
# use (HNSW, GIN, the primary key, (collection, source), (collection, content_sha256)) or no
# alternative to reading the table (the per-collection counts), so sequential scans are off on them.
SEARCH_SETTINGS = "SET enable_seqscan = off"
# GIN's fastupdate (on by default) puts new rows in a pending list that every index scan reads in
# full until VACUUM merges it: up to gin_pending_list_limit (4 MB) scanned once per term the lexical
# leg looks up. Right after an ingestion that made the leg ten times slower on real text
# (benchmarks/README.md#retrieval-at-real-size); with it off, each row goes into the index as it is
# written, which ingestion (bound by the embedding model) does not notice.
GIN_WRITES = "fastupdate = off"
MAX_QUERY_TERMS = 24  # a hard cap on the terms one query looks up, whatever the row budget allows
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
        "terms_gin": sql.Identifier(f"{table}_terms_gin"),
        "old_trgm": sql.Identifier(f"{table}_content_trgm"),
        "by_source": sql.Identifier(f"{table}_collection_source"),
    }


async def ensure_schema(conn: psycopg.AsyncConnection[Any], store: VectorStore, model: str, dim: int) -> None:
    """Create extensions, table and indexes if missing; refuse a table built for another model."""
    names = _names(store.table)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(TERMS_FUNCTION)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS dreamseed_rag_tables ("
            " table_name text PRIMARY KEY, model text NOT NULL, dim integer NOT NULL,"
            " text_search_config text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS dreamseed_rag_terms (table_name text NOT NULL, term text NOT NULL,"
            " frequency float8 NOT NULL, PRIMARY KEY (table_name, term))")
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
            " terms tsvector GENERATED ALWAYS AS (dreamseed_terms(content)) STORED,"
            " UNIQUE (collection, content_sha256))").format(dim=sql.Literal(dim), **names))
        # Tables made by DreamSeed 0.1 searched a `tsv` column (English only) and a pg_trgm index,
        # whose scans grew with the corpus (seconds at 10k chunks): replaced, once, by `terms`.
        await conn.execute(sql.SQL(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS terms tsvector"
            " GENERATED ALWAYS AS (dreamseed_terms(content)) STORED").format(**names))
        await conn.execute(sql.SQL("DROP INDEX IF EXISTS {old_trgm}").format(**names))
        await conn.execute(sql.SQL("ALTER TABLE {table} DROP COLUMN IF EXISTS tsv").format(**names))
        await conn.execute(sql.SQL("ALTER TABLE {table} ALTER COLUMN terms SET STATISTICS {n}").format(
            n=sql.Literal(TERMS_STATISTICS), **names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {hnsw} ON {table} USING hnsw (embedding vector_cosine_ops)"
            " WITH (m = {m}, ef_construction = {ef})").format(
                m=sql.Literal(store.hnsw_m), ef=sql.Literal(store.hnsw_ef_construction), **names))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {terms_gin} ON {table} USING gin (terms) WITH ({writes})").format(
                writes=sql.SQL(GIN_WRITES), **names))
        # An index made with fastupdate on (as earlier versions made it): off from now, and what its pending
        # list holds merged into the index once. Checked first, because the ALTER locks the index.
        gin = f"{store.table}_terms_gin"
        options = await (await conn.execute("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = %s::regclass",
                                            (gin,))).fetchone()
        if options is not None and GIN_WRITES.replace(" ", "") not in options[0]:
            await conn.execute(sql.SQL("ALTER INDEX {terms_gin} SET ({writes})").format(
                writes=sql.SQL(GIN_WRITES), **names))
            await conn.execute("SELECT gin_clean_pending_list(%s::regclass)", (gin,))
        await conn.execute(sql.SQL(
            "CREATE INDEX IF NOT EXISTS {by_source} ON {table} (collection, source)").format(**names))
        if row is None:
            await conn.execute(
                "INSERT INTO dreamseed_rag_tables (table_name, model, dim, text_search_config) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (table_name) DO NOTHING", (store.table, model, dim, TEXT_SEARCH_CONFIG))
        elif row[2] != TEXT_SEARCH_CONFIG:
            await conn.execute("UPDATE dreamseed_rag_tables SET text_search_config = %s WHERE table_name = %s",
                               (TEXT_SEARCH_CONFIG, store.table))


async def analyze(conn: psycopg.AsyncConnection[Any], table: str) -> None:
    """ANALYZE ``table``, then copy its term statistics where the lexical leg reads them."""
    async with conn.transaction():
        await conn.execute(sql.SQL("ANALYZE {table}").format(table=sql.Identifier(table)))
        await copy_term_frequencies(conn, table)


async def copy_term_frequencies(conn: psycopg.AsyncConnection[Any], table: str) -> None:
    """Copy the term statistics ANALYZE last gathered for ``table`` (ours after an ingestion, or
    autovacuum's) into dreamseed_rag_terms. ANALYZE samples the table and keeps its most common
    terms with their frequencies (pg_stats.most_common_elems, then the minimum, maximum and null
    frequency); they go into dreamseed_rag_terms, one indexed row per term, because looking a
    query's terms up in the 10,000-entry array itself cost milliseconds per query. The '' row holds
    half the least common frequency: what an untracked term is taken to have. Run it inside a
    transaction, so searches see the old rows or the new ones, never none."""
    await conn.execute("DELETE FROM dreamseed_rag_terms WHERE table_name = %s", (table,))
    await conn.execute(
        "INSERT INTO dreamseed_rag_terms (table_name, term, frequency)"
        " SELECT %(table)s, term, frequency FROM pg_stats,"
        "  unnest(most_common_elems::text::text[], most_common_elem_freqs) AS t(term, frequency)"
        " WHERE schemaname = current_schema() AND tablename = %(table)s AND attname = 'terms' AND term IS NOT NULL"
        " UNION ALL SELECT %(table)s, '', most_common_elem_freqs[cardinality(most_common_elems) + 1] / 2"
        " FROM pg_stats WHERE schemaname = current_schema() AND tablename = %(table)s AND attname = 'terms'",
        {"table": table})


async def configure_connection(conn: psycopg.AsyncConnection[Any], store: VectorStore) -> None:
    """Per-connection settings: the pgvector adapter and the HNSW search knobs."""
    from pgvector.psycopg import register_vector_async

    await register_vector_async(conn)
    await conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(store.ef_search),))
    await conn.execute("SELECT set_config('hnsw.iterative_scan', %s, false)", (store.iterative_scan,))
    await conn.execute(SEARCH_SETTINGS)


def open_pool(url: str, store: VectorStore, *, max_size: int = 8, timeout: float = 5.0) -> AsyncConnectionPool:
    """Connections in autocommit mode: a search is three single statements (one round trip each,
    where a transaction would add BEGIN and COMMIT to each); writes open their own transactions. Two
    stay open, because a hybrid search runs its two legs at once."""
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await configure_connection(conn, store)

    return AsyncConnectionPool(url, min_size=2, max_size=max_size, timeout=timeout, configure=configure, open=False,
                               kwargs={"autocommit": True}, name="dreamseed-rag", reconnect_timeout=60)


class DocumentStore:
    def __init__(self, pool: AsyncConnectionPool, store: VectorStore) -> None:
        self.pool = pool
        self.store = store
        self._names = _names(store.table)

    async def existing_hashes(self, collection: str, hashes: Sequence[str]) -> set[str]:
        found: set[str] = set()
        async with self.pool.connection() as conn:
            for start in range(0, len(hashes), 10_000):  # bounded statements for a 100k-chunk ingestion
                rows = await (await conn.execute(sql.SQL(
                    "SELECT content_sha256 FROM {table} WHERE collection = %s AND content_sha256 = ANY(%s)").format(
                        **self._names), (collection, list(hashes[start:start + 10_000])))).fetchall()
                found.update(row[0] for row in rows)
        return found

    async def replace_sources(self, collection: str, sources: Sequence[tuple[str, Sequence[str], Sequence[Chunk]]],
                              vectors: np.ndarray | None) -> tuple[int, int]:
        """Synchronise each (source, keep, new chunks) in ``collection``, in one transaction: the
        source's stored chunks whose hash is not in ``keep`` (stale parts of an edited file) go, the
        new chunks come in, ``vectors`` holding their embeddings in order. Returns (added, removed)."""
        chunks = [chunk for _, _, new in sources for chunk in new]
        removed = added = 0
        async with self.pool.connection() as conn, conn.transaction():
            for source, keep, _ in sources:
                cursor = await conn.execute(sql.SQL(
                    "DELETE FROM {table} WHERE collection = %s AND source = %s AND NOT (content_sha256 = ANY(%s))").format(
                        **self._names), (collection, source, list(keep)))
                removed += cursor.rowcount
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
        return added, removed

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

    async def analyze(self) -> None:
        """Refresh the lexical leg's term frequencies; run after an ingestion."""
        async with self.pool.connection() as conn:
            await analyze(conn, self.store.table)

    async def refresh_term_frequencies(self) -> None:
        """Take up what autovacuum's ANALYZE found since (documents written by other tools)."""
        async with self.pool.connection() as conn, conn.transaction():
            await copy_term_frequencies(conn, self.store.table)

    async def has_term_frequencies(self) -> bool:
        async with self.pool.connection() as conn:
            row = await (await conn.execute("SELECT EXISTS (SELECT 1 FROM dreamseed_rag_terms WHERE table_name = %s)",
                                            (self.store.table,))).fetchone()
        return bool(row and row[0])

    @functools.cached_property
    def lexical_query(self) -> sql.Composed:
        """The lexical leg: (id, rank) of the chunks whose terms weigh at least min_match of the
        query's, best first. A statement of its own, so that it runs beside the vector leg.
        Composed once per store: every retrieval runs it."""
        return sql.SQL(
            # Document frequencies, from ANALYZE (see `analyze`): an untracked term is rarer than
            # the least common tracked one (the '' row); no statistics yet: every term rare.
            "WITH query_terms AS (SELECT query.term, coalesce(tracked.frequency, (SELECT frequency FROM"
            "  dreamseed_rag_terms WHERE table_name = %(table)s AND term = ''), 0.0001) AS frequency"
            "  FROM unnest(tsvector_to_array(dreamseed_terms(%(text)s))) AS query(term)"
            "  LEFT JOIN dreamseed_rag_terms tracked ON tracked.table_name = %(table)s AND tracked.term = query.term"
            # Whole Korean words are left to their bigrams (a particle may still cling to them).
            "  WHERE query.term !~ '^[가-힣]{{3,}}$'),"
            # Rarest first, while the rows they are expected to match (frequency x table rows, each
            # capped at rows_per_term) stay within the leg's row budget. A term in more than
            # max_term_frequency of the chunks is left out, unless the table is so small that it
            # matches few rows anyway.
            " chunks AS (SELECT greatest(reltuples, 1) AS n FROM pg_class WHERE oid = %(table)s::regclass),"
            " chosen AS (SELECT term, weight FROM (SELECT term, ln(1 / frequency) AS weight,"
            "  sum(least(frequency * chunks.n, %(per_term)s)) OVER (ORDER BY frequency, term) AS expected_rows"
            "  FROM query_terms, chunks WHERE frequency <= %(max_freq)s OR frequency * chunks.n <= %(per_term)s) ranked"
            "  WHERE expected_rows <= %(row_budget)s ORDER BY expected_rows LIMIT {max_terms}),"
            " postings AS (SELECT chosen.term, chosen.weight, found.id FROM chosen CROSS JOIN LATERAL ("
            "  SELECT id FROM {table} WHERE collection = %(c)s AND terms @@ quote_literal(chosen.term)::tsquery"
            "  LIMIT %(per_term)s) found),"
            # The query's weight counts only terms the collection holds: a typo or a word no
            # document uses must not make every real match look partial.
            " present AS (SELECT sum(weight) AS weight FROM (SELECT DISTINCT term, weight FROM postings) terms)"
            " SELECT id, row_number() OVER (ORDER BY sum(weight) DESC, id) AS rank FROM postings"
            " GROUP BY id HAVING sum(weight) >= %(min_match)s * (SELECT weight FROM present)"
            " ORDER BY sum(weight) DESC, id LIMIT %(n)s").format(max_terms=sql.Literal(MAX_QUERY_TERMS), **self._names)

    @functools.cached_property
    def vector_query(self) -> sql.Composed:
        """The vector leg: (id, rank) of the nearest chunks (HNSW) with cosine similarity at least min_sim."""
        return sql.SQL(
            "SELECT id, row_number() OVER (ORDER BY distance) AS rank FROM ("
            " SELECT id, embedding <=> %(q)s AS distance FROM {table} WHERE collection = %(c)s"
            " ORDER BY embedding <=> %(q)s LIMIT %(n)s) nearest WHERE 1 - distance >= %(min_sim)s").format(**self._names)

    def search_params(self, collection: str, *, text: str = "", vector: np.ndarray | None = None, top_k: int,
                      min_similarity: float = -1.0, min_term_match: float = 0.0) -> dict[str, Any]:
        store = self.store
        return {"c": collection, "n": max(4 * top_k, 20), "q": vector, "text": without_particles(text),
                "min_sim": min_similarity, "table": store.table, "max_freq": store.max_term_frequency,
                "row_budget": store.lexical_rows, "per_term": store.rows_per_term, "min_match": min_term_match}

    async def _ranks(self, query: sql.Composed, params: dict[str, Any]) -> list[tuple[int, int]]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, params)).fetchall()
        return [(row[0], row[1]) for row in rows]

    async def search(self, collection: str, *, text: str, vector: np.ndarray | Awaitable[np.ndarray] | None,
                     mode: RetrievalMode, top_k: int, min_similarity: float = -1.0, min_term_match: float = 0.0,
                     lexical_weight: float = 1.0, overlap_embedding: bool = True) -> list[Hit]:
        """Retrieve in ``mode``. The legs are separate statements on separate connections, so Postgres
        runs them at once. ``vector`` may be an awaitable (the query being embedded; pass one only in
        vector or hybrid mode, which awaits it). With ``overlap_embedding`` the lexical leg starts
        while the vector is still coming: right when the embedding waits on another machine. Without,
        the embedding is awaited first and both legs then run together: when the embedding computes
        on this machine's cores, a leg beside it only slows it down (hybrid P95 on 2 cores 25 -> 18 ms,
        benchmarks/README.md). Their ranks are fused here and the winners fetched."""
        use_lexical = mode in ("lexical", "hybrid")
        use_vector = mode in ("vector", "hybrid") and vector is not None
        if use_vector and not overlap_embedding and vector is not None and not isinstance(vector, np.ndarray):
            vector = await vector
        lexical = (asyncio.ensure_future(self._ranks(self.lexical_query, self.search_params(
            collection, text=text, top_k=top_k, min_term_match=min_term_match))) if use_lexical else None)
        legs: list[tuple[list[tuple[int, int]], float]] = []
        query_vector = None
        try:
            if use_vector:
                assert vector is not None
                query_vector = vector if isinstance(vector, np.ndarray) else await vector
                legs.append((await self._ranks(self.vector_query, self.search_params(
                    collection, vector=query_vector, top_k=top_k, min_similarity=min_similarity)), 1.0))
            if lexical is not None:
                legs.append((await lexical, lexical_weight))
        finally:
            if lexical is not None and not lexical.done():
                lexical.cancel()
                await asyncio.gather(lexical, return_exceptions=True)
        return await self.fetch(fuse(legs, top_k), query_vector)

    async def fetch(self, scored: Sequence[tuple[int, float]], vector: np.ndarray | None) -> list[Hit]:
        """The chunks behind fused (id, score) pairs, in that order, with their cosine similarity."""
        if not scored:
            return []
        similarity = sql.SQL("1 - (embedding <=> %(q)s)") if vector is not None else sql.SQL("NULL::float8")
        query = sql.SQL("SELECT id, source, chunk_index, content, metadata, {similarity} FROM {table}"
                        " WHERE id = ANY(%(ids)s)").format(similarity=similarity, **self._names)
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(query, {"ids": [id_ for id_, _ in scored], "q": vector})).fetchall()
        by_id = {row[0]: row for row in rows}
        return [Hit(id_, row[1], row[2], row[3], row[4], score, row[5])
                for id_, score in scored if (row := by_id.get(id_)) is not None]


def fuse(legs: Sequence[tuple[Sequence[tuple[int, int]], float]], top_k: int) -> list[tuple[int, float]]:
    """Weighted reciprocal rank fusion: each chunk scores the sum over the legs that found it of
    weight / (RRF_K + rank); the ``top_k`` best, ties broken by id (so results are repeatable)."""
    scores: dict[int, float] = {}
    for ranks, weight in legs:
        for id_, rank in ranks:
            scores[id_] = scores.get(id_, 0.0) + weight / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top_k]


def hits_as_dicts(hits: Iterable[Hit]) -> list[dict[str, Any]]:
    return [{"id": h.id, "source": h.source, "chunk_index": h.chunk_index, "score": round(h.score, 6),
             "similarity": None if h.similarity is None else round(h.similarity, 4), "content": h.content,
             "metadata": h.metadata} for h in hits]
