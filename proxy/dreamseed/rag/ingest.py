"""Files -> chunks -> vectors -> rows.

A source (a file path, or a name given through the admin API) is synchronised as a whole:
chunks already stored under the same content hash are skipped without embedding them
again, chunks of an edited file that no longer exist are removed, new ones are embedded in
batches and inserted.

Embedding is nearly all the cost (all-MiniLM-L6-v2 on CPU: tens of chunks a second per core),
so the pipeline keeps the model busy: sources go in groups of about GROUP_CHUNKS new chunks;
within a group the texts are embedded shortest first (a batch pads to its longest text, so
sorting cuts the padding the model computes for nothing), and while one group's rows are
written, the next group is already being embedded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..policy import Chunking
from .chunking import chunk_text
from .embedders import BatchingEmbedder
from .store import Chunk, DocumentStore

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".pdf"}


class IngestError(Exception):
    pass


GROUP_CHUNKS = 256  # new chunks per embed/write step: big enough to sort well, small enough to show progress


@dataclass
class IngestSummary:
    files: int = 0
    chunks: int = 0  # chunks the sources are made of now
    added: int = 0
    skipped: int = 0  # unchanged (same content already stored)
    removed: int = 0  # stale chunks of edited sources
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def chunks_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "chunks": self.chunks, "added": self.added, "skipped": self.skipped,
                "removed": self.removed, "seconds": round(self.seconds, 3),
                "chunks_per_second": round(self.chunks_per_second, 1), "errors": self.errors}

    def line(self) -> str:
        return (f"{self.files} files, {self.chunks} chunks: {self.added} added, {self.skipped} skipped (unchanged), "
                f"{self.removed} removed (stale) in {self.seconds:.2f} s ({self.chunks_per_second:.0f} chunks/s)"
                + (f"; {len(self.errors)} error(s)" if self.errors else ""))


@dataclass
class _Source:
    name: str
    keep: list[str]  # hashes of every chunk the source is made of now
    new: list[Chunk]  # those not stored yet


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """Text files named, or found under the named folders (sorted, so runs are repeatable)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise IngestError(f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                                  f"(supported: {', '.join(sorted(TEXT_SUFFIXES))})")
            found.append(path)
        else:
            raise IngestError(f"{path}: no such file or directory")
    return found


def read_text(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        return _pdf_text(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


async def ingest_texts(store: DocumentStore, embedder: BatchingEmbedder, collection: str,
                       documents: Sequence[tuple[str, str, dict[str, Any]]], chunking: Chunking,
                       progress: Callable[[int], object] | None = None,
                       planned: Callable[[int], object] | None = None,
                       summary: IngestSummary | None = None) -> IngestSummary:
    """Synchronise each (source, text, metadata) into ``collection``. ``planned`` hears how many
    chunks need embedding once that is known; ``progress`` hears each group's count as it is stored.
    Each group is committed on its own, and ``summary`` (made here if not given) counts what is
    committed as it goes: an interrupted ingestion keeps, and says, what it stored, which a rerun
    skips."""
    summary = summary if summary is not None else IngestSummary()
    started = time.perf_counter()
    sources: list[_Source] = []
    for name, text, metadata in documents:
        chunks = [Chunk(name, index, content, metadata)
                  for index, content in enumerate(chunk_text(text, chunking.size, chunking.overlap))]
        # The same passage twice in one file is stored once (its first occurrence).
        first: dict[str, Chunk] = {}
        for chunk in chunks:
            first.setdefault(chunk.sha256, chunk)
        sources.append(_Source(name, list(first), list(first.values())))
        summary.files += 1
        summary.chunks += len(chunks)
    known = await store.existing_hashes(collection, [h for source in sources for h in source.keep])
    for source in sources:
        source.new = [chunk for chunk in source.new if chunk.sha256 not in known]
    if planned is not None:
        planned(sum(len(source.new) for source in sources))

    groups: list[list[_Source]] = [[]]
    size = 0
    for source in sources:
        if size >= GROUP_CHUNKS:
            groups.append([])
            size = 0
        groups[-1].append(source)
        size += len(source.new)

    async def embed(group: list[_Source]) -> np.ndarray | None:
        chunks = [chunk for source in group for chunk in source.new]
        if not chunks:
            return None
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].content))
        vectors = await embedder.embed_many([chunks[i].content for i in order])
        unsorted = np.empty_like(vectors)
        unsorted[order] = vectors
        return unsorted

    pending = asyncio.ensure_future(embed(groups[0]))
    try:
        for index, group in enumerate(groups):
            vectors = await pending
            if index + 1 < len(groups):  # the next group embeds while this one is written
                pending = asyncio.ensure_future(embed(groups[index + 1]))
            added, removed = await store.replace_sources(
                collection, [(source.name, source.keep, source.new) for source in group], vectors)
            summary.added += added
            summary.removed += removed
            if progress is not None:
                progress(sum(len(source.new) for source in group))
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    summary.skipped = summary.chunks - summary.added
    if summary.added or summary.removed:
        await store.analyze()  # the lexical leg's term frequencies
    summary.seconds = time.perf_counter() - started
    return summary


async def ingest_files(store: DocumentStore, embedder: BatchingEmbedder, collection: str, files: Sequence[Path],
                       chunking: Chunking, *, show_progress: bool = True,
                       summary: IngestSummary | None = None) -> IngestSummary:
    from tqdm import tqdm

    documents = []
    errors = []
    for path in files:
        try:
            documents.append((str(path), read_text(path), {"path": str(path)}))
        except IngestError as exc:
            errors.append(str(exc))
    # Counted in chunks to embed, so the bar's rate and time left are the real ones.
    bar = tqdm(total=0, unit="chunk", desc=f"ingest {collection}", disable=not show_progress)

    def planned(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        summary = await ingest_texts(store, embedder, collection, documents, chunking, progress=bar.update,
                                     planned=planned, summary=summary)
    finally:
        bar.close()
    summary.errors = errors
    return summary


def _pdf_text(path: Path) -> str:
    """The text layer of a PDF, page by page (pypdf: pure Python). A scan without one is an
    error, not an empty document."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise IngestError(f"{path}: the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise IngestError(f"{path}: not a readable PDF ({exc})") from None
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise IngestError(f"{path}: the PDF has no text layer (a scan?); run OCR first")
    return text
