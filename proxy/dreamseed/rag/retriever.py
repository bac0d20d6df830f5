"""What the proxy calls per request: retrieve within a time budget, or degrade.

The store and the embedder come up at start, off the event loop. If either is unavailable
then or later, requests are answered without context (``degraded``), logged and counted, and
a background task keeps trying to bring them up. The one failure that stops the proxy is a
table built for another embedding model: that is a configuration error, and answering with
vectors from two spaces would be silent garbage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..policy import Rag, RagSettings
from .database import Database, open_database
from .embedders import BatchingEmbedder, Embedder, EmbedderError, load_embedder
from .language import language
from .store import DocumentStore, Hit, StoreMismatchError, ensure_schema, open_pool

log = logging.getLogger("dreamseed.rag")

RETRY_INTERVAL_S = 5.0
TERMS_REFRESH_S = 600.0


@dataclass(slots=True)
class Retrieval:
    outcome: str  # hits | empty | degraded
    hits: list[Hit] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class RagUnavailableError(Exception):
    """The store or the embedder is not up (yet)."""


class Retriever:
    def __init__(self, rag: Rag, environ: Mapping[str, str] = os.environ) -> None:
        self.rag = rag
        self.environ = environ
        self.database: Database | None = None
        self.pool: AsyncConnectionPool | None = None
        self.store: DocumentStore | None = None
        self.embedder: BatchingEmbedder | None = None
        self.problem: str | None = "starting"
        self._task: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.store is not None and self.embedder is not None

    async def start(self) -> None:
        """Bring up embedder and store. A model mismatch raises StoreMismatchError; anything else is
        reported and retried in the background."""
        try:
            await self.bring_up()
        except StoreMismatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means: degraded for now, retry
            self.problem = str(exc)
            log.error("RAG unavailable, requests are answered without context until it is up: %s", exc)
            self._task = asyncio.get_running_loop().create_task(self._keep_trying())

    async def bring_up(self) -> None:
        """Load the embedder, open the database, create or check the schema; raises on failure."""
        if self.embedder is None:
            embedder: Embedder = await asyncio.to_thread(load_embedder, self.rag.embedder, self.environ)
            self.embedder = BatchingEmbedder(embedder, max_batch=self.rag.embedder.batch_size,
                                             max_query_tokens=self.rag.embedder.max_query_tokens)
        if self.database is None:
            self.database = await asyncio.to_thread(open_database, self.environ)
        if self.store is None:
            model = self.embedder.embedder
            async with await psycopg.AsyncConnection.connect(self.database.url, connect_timeout=5) as conn:
                await ensure_schema(conn, self.rag.store, model.model, model.dim)
            pool = open_pool(self.database.url, self.rag.store)
            await pool.open(wait=True, timeout=10)
            store = DocumentStore(pool, self.rag.store)
            if not await store.has_term_frequencies():
                # A table from DreamSeed 0.1, or filled by other means: without frequencies every
                # term would weigh the same until the next ingestion.
                log.info("RAG: gathering term statistics for table %s", self.rag.store.table)
                await store.analyze()
            self.pool, self.store = pool, store
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_term_frequencies())
        self.problem = None
        log.info("RAG ready: %s (%d-d) on %s, table %s", self.embedder.embedder.model, self.embedder.embedder.dim,
                 self.database.description, self.rag.store.table)

    async def _refresh_term_frequencies(self) -> None:
        """Every TERMS_REFRESH_S, take up the term statistics autovacuum gathered meanwhile."""
        while True:
            await asyncio.sleep(TERMS_REFRESH_S)
            if self.store is None:
                return
            try:
                await self.store.refresh_term_frequencies()
            except Exception as exc:  # noqa: BLE001 - stale frequencies are better than none: keep them, retry
                log.warning("RAG: could not refresh term statistics: %s", exc)

    async def _keep_trying(self) -> None:
        while not self.ready:
            await asyncio.sleep(RETRY_INTERVAL_S)
            try:
                await self.bring_up()
            except StoreMismatchError as exc:
                self.problem = str(exc)
                log.error("RAG disabled: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001
                self.problem = str(exc)

    async def search(self, settings: RagSettings, query: str, *, top_k: int | None = None,
                     min_similarity: float | None = None, min_term_match: float | None = None) -> list[Hit]:
        if self.store is None or self.embedder is None:
            raise RagUnavailableError(self.problem or "RAG is not ready")
        mode = settings.mode
        if mode == "hybrid" and language(query) not in self.rag.embedder.languages:
            mode = "lexical"  # the model cannot read it: its neighbours would be noise (rag.yaml embedder.languages)
        # The lexical leg (Postgres) runs beside the embedding only when the embedding leaves this
        # machine's cores free (an embedding server); see DocumentStore.search.
        return await self.store.search(
            settings.collection, text=query, vector=self.embedder.embed_one(query) if mode != "lexical" else None,
            mode=mode, top_k=top_k or settings.top_k,
            min_similarity=settings.min_similarity if min_similarity is None else min_similarity,
            min_term_match=settings.min_term_match if min_term_match is None else min_term_match,
            lexical_weight=settings.lexical_weight, overlap_embedding=not self.embedder.embedder.uses_local_cores)

    async def retrieve(self, settings: RagSettings, query: str) -> Retrieval:
        """Hits for a request, never an exception: failures and overruns come back degraded."""
        started = time.perf_counter()
        try:
            hits = await asyncio.wait_for(self.search(settings, query), self.rag.budget)
        except TimeoutError:
            error = f"retrieval took longer than its {self.rag.budget * 1e3:.0f} ms budget"
        except (RagUnavailableError, EmbedderError, psycopg.Error, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - pool timeouts and the like: still never a 500
            error = f"{type(exc).__name__}: {exc}"
        else:
            return Retrieval("hits" if hits else "empty", hits, time.perf_counter() - started)
        log.warning("RAG degraded (%s): answering without context", error)
        return Retrieval("degraded", [], time.perf_counter() - started, error)

    def status(self) -> dict[str, Any]:
        model = self.embedder.embedder if self.embedder else None
        return {"ready": self.ready, "problem": self.problem,
                "embedder": {"kind": self.rag.embedder.kind, "model": self.rag.embedder.model,
                             "dim": model.dim if model else None},
                "database": self.database.description if self.database else None, "table": self.rag.store.table}

    async def aclose(self) -> None:
        for task in (self._task, self._refresh):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
        if self.embedder is not None:
            self.embedder.close()
        if self.database is not None:
            await asyncio.to_thread(self.database.stop)
