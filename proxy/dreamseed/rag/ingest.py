"""Files -> chunks -> vectors -> rows.

A source (a file path, or a name given through the admin API) is synchronised as a whole:
chunks already stored under the same content hash are skipped without embedding them
again, chunks of an edited file that no longer exist are removed, new ones are embedded in
batches and inserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import Chunking
from .chunking import chunk_text
from .embedders import BatchingEmbedder
from .store import Chunk, DocumentStore

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".pdf"}


class IngestError(Exception):
    pass


@dataclass
class IngestSummary:
    files: int = 0
    chunks: int = 0  # chunks the sources are made of now
    added: int = 0
    skipped: int = 0  # unchanged (same content already stored)
    removed: int = 0  # stale chunks of edited sources
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "chunks": self.chunks, "added": self.added, "skipped": self.skipped,
                "removed": self.removed, "seconds": round(self.seconds, 3), "errors": self.errors}

    def line(self) -> str:
        return (f"{self.files} files, {self.chunks} chunks: {self.added} added, {self.skipped} skipped (unchanged), "
                f"{self.removed} removed (stale) in {self.seconds:.2f} s"
                + (f"; {len(self.errors)} error(s)" if self.errors else ""))


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
                       progress: Callable[[int], object] | None = None) -> IngestSummary:
    """Synchronise each (source, text, metadata) into ``collection``."""
    summary = IngestSummary()
    started = time.perf_counter()
    for source, text, metadata in documents:
        pieces = chunk_text(text, chunking.size, chunking.overlap)
        chunks = [Chunk(source, index, content, metadata) for index, content in enumerate(pieces)]
        # The same passage twice in one file is stored once (its first occurrence).
        first: dict[str, Chunk] = {}
        for chunk in chunks:
            first.setdefault(chunk.sha256, chunk)
        unique = list(first.values())
        known = await store.existing_hashes(collection, [chunk.sha256 for chunk in unique])
        new = [chunk for chunk in unique if chunk.sha256 not in known]
        vectors = await embedder.embed_many([chunk.content for chunk in new]) if new else None
        added, removed = await store.replace_source(collection, source, [c.sha256 for c in unique], new, vectors)
        summary.files += 1
        summary.chunks += len(chunks)
        summary.added += added
        summary.skipped += len(chunks) - added
        summary.removed += removed
        if progress is not None:
            progress(1)
    summary.seconds = time.perf_counter() - started
    return summary


async def ingest_files(store: DocumentStore, embedder: BatchingEmbedder, collection: str, files: Sequence[Path],
                       chunking: Chunking, *, show_progress: bool = True) -> IngestSummary:
    from tqdm import tqdm

    documents = []
    errors = []
    for path in files:
        try:
            documents.append((str(path), read_text(path), {"path": str(path)}))
        except IngestError as exc:
            errors.append(str(exc))
    bar = tqdm(total=len(documents), unit="file", desc=f"ingest {collection}", disable=not show_progress)
    try:
        summary = await ingest_texts(store, embedder, collection, documents, chunking, progress=bar.update)
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
