"""The retrieval SQL against a real PostgreSQL+pgvector with enough rows for the planner to act as it
does at scale: each leg uses its index and reads a bounded number of rows (EXPLAIN ANALYZE of the
very statement `DocumentStore.search` runs), and a table made by DreamSeed 0.1 is migrated."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from dreamseed.policy import VectorStore
from dreamseed.rag.database import Database, open_database
from dreamseed.rag.store import (
    MAX_QUERY_TERMS,
    SEARCH_SETTINGS,
    DocumentStore,
    analyze,
    ensure_schema,
    fuse,
    open_pool,
)

ROWS = 4000
WORDS = [f"{stem}{suffix}" for stem in ("alpha", "bravo", "delta", "gamma", "kappa", "sigma", "omega", "theta")
         for suffix in ("port", "line", "gate", "node", "mesh", "pool", "disk", "host", "wire", "card")]
KOREAN = ["비밀번호를", "재설정하려면", "계정", "설정에서", "요청", "한도를", "초과하면", "모델이", "응답합니다"]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = open_database({"DREAMSEED_STATE_DIR": str(tmp_path_factory.mktemp("rag-store"))})
    try:
        yield database
    finally:
        database.stop()


def fill(url: str, store: VectorStore) -> None:
    """ROWS chunks of made-up words (a few rare, most common) and random unit vectors, loaded in bulk,
    then the product's own ANALYZE step."""
    from pgvector.psycopg import register_vector

    rng = random.Random(7)
    vectors = np.random.default_rng(7).normal(size=(ROWS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    async def schema_and_stats(stats: bool) -> None:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            if stats:
                await analyze(conn, store.table)
            else:
                await ensure_schema(conn, store, "sentence-transformers/all-MiniLM-L6-v2", 384)

    asyncio.run(schema_and_stats(False))
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        with conn.cursor().copy(f"COPY {store.table} (collection, source, chunk_index, content, content_sha256, "
                                "embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "int4", "text", "text", "vector"])
            for index in range(ROWS):
                words = rng.choices(WORDS[:20], k=30) + rng.choices(WORDS, k=5) + rng.choices(KOREAN, k=3)
                copy.write_row(("c", f"doc{index}", 0, " ".join(words), f"{index:064x}", vectors[index]))
    asyncio.run(schema_and_stats(True))


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def explain(url: str, store: VectorStore, text: str, **settings: Any) -> list[dict[str, Any]]:
    from pgvector.psycopg import register_vector

    """The statements of a hybrid search (the lexical leg, the vector leg, the fetch of the fused
    winners), EXPLAIN ANALYZEd: their plan nodes."""
    documents = DocumentStore(None, store)  # type: ignore[arg-type]  # only builds the statements
    vector = np.random.default_rng(1).normal(size=384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    params = documents.search_params("c", text=text, vector=vector, top_k=4,
                                     min_term_match=settings.get("min_term_match", 0.0))
    nodes: list[dict[str, Any]] = []
    with psycopg.connect(url) as conn:
        register_vector(conn)
        conn.execute("SET hnsw.iterative_scan = relaxed_order")
        conn.execute(SEARCH_SETTINGS)
        for query in (documents.lexical_query, documents.vector_query):
            (result,) = conn.execute(sql_explain(query), params).fetchone()  # type: ignore[misc]
            nodes += plan_nodes(result[0]["Plan"])
    return nodes


def sql_explain(query: psycopg.sql.Composed) -> psycopg.sql.Composed:
    return psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(query)


def test_each_leg_uses_its_index_and_reads_a_bounded_number_of_rows(database: Database) -> None:
    store = VectorStore(table="plan_check", rows_per_term=50, lexical_rows=400)
    fill(database.url, store)
    long_message = " ".join(random.Random(3).choices(WORDS, k=300)) + " 비밀번호를 재설정하려면 어떻게 하나요"
    pages: list[float] = []  # index pages read per term looked up
    for text in ("alphaport", "kappawire sigmacard omegahost", long_message):
        nodes = [n for n in explain(database.url, store, text) if n.get("Relation Name") == store.table]
        kinds = {(n["Node Type"], n.get("Index Name")) for n in nodes}
        assert ("Index Scan", "plan_check_embedding_hnsw") in kinds, kinds  # the vector leg: HNSW
        assert not any(n["Node Type"] == "Seq Scan" for n in nodes), kinds  # nothing reads the whole table
        lexical = [n for n in nodes if n["Node Type"] == "Bitmap Heap Scan"]
        assert lexical, kinds  # the lexical leg: the GIN index on terms, one bitmap scan per term looked up
        # Not the (collection, source) index with the terms checked row by row: the whole collection
        # read once per term, which the planner picks when the GIN index's pending list makes it look dear.
        assert {child["Index Name"] for n in lexical for child in n["Plans"]} == {"plan_check_terms_gin"}, kinds
        assert all(n["Actual Rows"] <= store.rows_per_term for n in lexical), [n["Actual Rows"] for n in lexical]
        assert all(n["Actual Loops"] <= MAX_QUERY_TERMS for n in lexical)
        rows_read = sum(n["Actual Rows"] * n["Actual Loops"] for n in lexical)
        # Terms are taken while their expected rows fit lexical_rows; each is cut at rows_per_term.
        assert rows_read <= store.lexical_rows + store.rows_per_term, (text[:40], rows_read)
        # Each term's lookup reads the index pages that lead to its postings, not every row written
        # since the last VACUUM (a GIN pending list: the rows above were loaded with the index in place).
        lookups = [n for n in explain(database.url, store, text) if n.get("Index Name") == "plan_check_terms_gin"]
        pages += [(n["Shared Hit Blocks"] + n["Shared Read Blocks"]) / n["Actual Loops"] for n in lookups if n["Actual Loops"]]
    assert pages and max(pages) <= 8, pages


def test_rare_terms_outrank_common_ones_and_a_lexical_hit_needs_most_of_the_query(database: Database) -> None:
    store = VectorStore(table="weights")
    asyncio.run(_weights(database.url, store))


async def _weights(url: str, store: VectorStore) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await ensure_schema(conn, store, "sentence-transformers/all-MiniLM-L6-v2", 3)
        common = "the gateway restarts the worker"
        rows = [(f"common{i}", f"{common} number {i}") for i in range(40)]
        rows += [("both", "the quokka met a kiwi near the worker"), ("half", "quokka sightings are rare")]
        for source, content in rows:
            await conn.execute(f"INSERT INTO {store.table} (collection, source, chunk_index, content, content_sha256,"
                               " embedding) VALUES ('c', %s, 0, %s, md5(%s), '[1,0,0]')", (source, content, content))
        await conn.commit()
        await analyze(conn, store.table)
    pool = open_pool(url, store)
    await pool.open(wait=True)
    try:
        documents = DocumentStore(pool, store)
        hits = await documents.search("c", text="quokka kiwi worker", vector=None, mode="lexical", top_k=5)
        # quokka and kiwi are rare, so they weigh most; "worker" is in every chunk and weighs next to nothing.
        assert [hit.source for hit in hits][:2] == ["both", "half"] and len(hits) == 5
        strict = await documents.search("c", text="quokka kiwi worker", vector=None, mode="lexical", top_k=5,
                                        min_term_match=0.7)
        assert [hit.source for hit in strict] == ["both"]  # "half" holds quokka only: about half the weight
        nothing = await documents.search("c", text="zebra giraffe", vector=None, mode="lexical", top_k=5,
                                         min_term_match=0.7)
        assert nothing == []
    finally:
        await pool.close()


def test_a_table_from_dreamseed_0_1_is_migrated_to_the_terms_column(database: Database, tmp_path: Path) -> None:
    store = VectorStore(table="old_docs")
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        conn.execute(
            "CREATE TABLE old_docs (id bigserial PRIMARY KEY, collection text NOT NULL, source text NOT NULL,"
            " chunk_index integer NOT NULL, content text NOT NULL, content_sha256 text NOT NULL,"
            " metadata jsonb NOT NULL DEFAULT '{}'::jsonb, embedding vector(3) NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,"
            " UNIQUE (collection, content_sha256))")
        conn.execute("CREATE INDEX old_docs_tsv_gin ON old_docs USING gin (tsv)")
        conn.execute("CREATE INDEX old_docs_content_trgm ON old_docs USING gin (content gin_trgm_ops)")
        conn.execute("INSERT INTO old_docs (collection, source, chunk_index, content, content_sha256, embedding)"
                     " VALUES ('c', 'kb.md', 0, '비밀번호를 재설정하려면 설정 메뉴로 가세요', 'h', '[1,0,0]')")

    async def migrate() -> list[str]:
        async with await psycopg.AsyncConnection.connect(database.url) as conn:
            await ensure_schema(conn, store, "m", 3)
            await conn.commit()
        pool = open_pool(database.url, store)
        await pool.open(wait=True)
        try:
            hits = await DocumentStore(pool, store).search("c", text="비밀번호 재설정", vector=None, mode="lexical",
                                                           top_k=3, min_term_match=0.7)
            return [hit.source for hit in hits]
        finally:
            await pool.close()

    assert asyncio.run(migrate()) == ["kb.md"]  # the old row is found through the new column
    with psycopg.connect(database.url) as conn:
        columns = {row[0] for row in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'old_docs'::regclass"
                                                  " AND attnum > 0 AND NOT attisdropped")}
        assert "terms" in columns and "tsv" not in columns
        indexes = {row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'old_docs'")}
        assert "old_docs_content_trgm" not in indexes and "old_docs_terms_gin" in indexes


def gin_pending_pages(url: str, index: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        row = conn.execute("SELECT pending_pages FROM pgstatginindex(%s::regclass)", (index,)).fetchone()
    assert row is not None
    return int(row[0])


def test_rows_written_reach_the_lexical_index_at_once_and_an_old_index_is_switched(database: Database) -> None:
    """Ingestion writes through the live GIN index; with fastupdate on, those rows would wait in a
    pending list that every term lookup reads in full. An index made that way is switched on start."""
    store = VectorStore(table="written_live")
    fill(database.url, store)  # COPY with the product's indexes in place
    assert gin_pending_pages(database.url, "written_live_terms_gin") == 0
    with psycopg.connect(database.url, autocommit=True) as conn:  # the index as earlier versions made it
        conn.execute("DROP INDEX written_live_terms_gin")
        conn.execute("CREATE INDEX written_live_terms_gin ON written_live USING gin (terms)")
        conn.execute("INSERT INTO written_live (collection, source, chunk_index, content, content_sha256, embedding)"
                     " SELECT 'c', 'late', 0, content || ' late', md5(content || id), embedding FROM written_live")
    assert gin_pending_pages(database.url, "written_live_terms_gin") > 0

    async def start() -> None:
        async with await psycopg.AsyncConnection.connect(database.url) as conn:
            await ensure_schema(conn, store, "sentence-transformers/all-MiniLM-L6-v2", 384)

    asyncio.run(start())
    assert gin_pending_pages(database.url, "written_live_terms_gin") == 0
    with psycopg.connect(database.url) as conn:
        (options,) = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'written_live_terms_gin'").fetchone()  # type: ignore[misc]
    assert options == ["fastupdate=off"]


def test_fusion_adds_weighted_reciprocal_ranks_and_breaks_ties_by_id() -> None:
    vector, lexical = [(1, 1), (2, 2), (3, 3)], [(3, 1), (4, 2)]
    fused = fuse([(vector, 1.0), (lexical, 1.0)], top_k=3)
    assert [id_ for id_, _ in fused] == [3, 1, 2]  # found by both legs first
    assert fused[0][1] == pytest.approx(1 / 63 + 1 / 61)
    assert [id_ for id_, _ in fuse([(vector, 1.0), (lexical, 3.0)], top_k=2)] == [3, 4]
    assert [id_ for id_, _ in fuse([([(9, 1)], 1.0), ([(5, 1)], 1.0)], top_k=2)] == [5, 9]  # a tie: lower id first
    assert fuse([], top_k=4) == []


def test_term_statistics_are_gathered_at_start_and_taken_up_from_a_later_analyze(database: Database) -> None:
    from dreamseed.policy import EmbedderPolicy, Rag
    from dreamseed.rag.retriever import Retriever
    from support import rag_model_dir

    store = VectorStore(table="written_elsewhere")
    model = EmbedderPolicy(model_path=str(rag_model_dir()))

    def insert(rows: list[str]) -> None:
        with psycopg.connect(database.url, autocommit=True) as conn:
            for index, content in enumerate(rows):
                conn.execute(f"INSERT INTO {store.table} (collection, source, chunk_index, content, content_sha256,"
                             f" embedding) VALUES ('c', 's', 0, %s, md5(%s), array_fill(0.1, ARRAY[384])::vector)",
                             (content, f"{content}{index}"))

    def frequency(term: str) -> float | None:
        with psycopg.connect(database.url) as conn:
            row = conn.execute("SELECT frequency FROM dreamseed_rag_terms WHERE table_name = %s AND term = %s",
                               (store.table, term)).fetchone()
        return None if row is None else row[0]

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(database.url) as conn:
            await ensure_schema(conn, store, model.model, 384)
            await conn.commit()
        # Rows written by another tool (or a DreamSeed 0.1 table just migrated): no statistics yet.
        insert(["the walrus gateway restarts"] * 30 + ["a quiet harbour"] * 10)
        retriever = Retriever(Rag(embedder=model, store=store), {"DATABASE_URL": database.url})
        await retriever.bring_up()
        try:
            assert frequency("walrus") == pytest.approx(0.75)  # gathered at start: 30 of 40 chunks
            insert(["a penguin colony"] * 40)
            with psycopg.connect(database.url, autocommit=True) as conn:
                conn.execute(f"ANALYZE {store.table}")  # what autovacuum does on its own
            assert frequency("penguin") is None
            assert retriever.store is not None
            await retriever.store.refresh_term_frequencies()  # what the retriever runs every TERMS_REFRESH_S
            assert frequency("penguin") == pytest.approx(0.5) and frequency("walrus") == pytest.approx(0.375)
        finally:
            await retriever.aclose()

    asyncio.run(scenario())


def test_the_lexical_leg_waits_for_an_embedding_on_local_cores_and_overlaps_a_remote_one(database: Database) -> None:
    policy = VectorStore(table="overlap")

    async def scenario(overlap: bool) -> list[str]:
        async with await psycopg.AsyncConnection.connect(database.url) as conn:
            await ensure_schema(conn, policy, "m", 3)
            await conn.execute("INSERT INTO overlap (collection, source, chunk_index, content, content_sha256, embedding)"
                               " VALUES ('c', 'kb.md', 0, 'the quokka', 'h', '[1,0,0]') ON CONFLICT DO NOTHING")
            await conn.commit()
        events: list[str] = []

        class Recording(DocumentStore):
            async def _ranks(self, query: psycopg.sql.Composed, params: dict[str, Any]) -> list[tuple[int, int]]:
                events.append("lexical" if query is self.lexical_query else "vector")
                return await super()._ranks(query, params)

        async def embedding() -> np.ndarray:
            await asyncio.sleep(0.2)
            events.append("embedded")
            return np.array([1, 0, 0], dtype=np.float32)

        pool = open_pool(database.url, policy)
        await pool.open(wait=True)
        try:
            hits = await Recording(pool, policy).search("c", text="quokka", vector=embedding(), mode="hybrid", top_k=3,
                                                        overlap_embedding=overlap)
        finally:
            await pool.close()
        assert [hit.source for hit in hits] == ["kb.md"]
        return events

    assert asyncio.run(scenario(True)) == ["lexical", "embedded", "vector"]  # an embedding server: the leg meanwhile
    in_process = asyncio.run(scenario(False))  # the model on this machine's cores: nothing beside it
    assert in_process[0] == "embedded" and sorted(in_process[1:]) == ["lexical", "vector"]
