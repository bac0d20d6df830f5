"""Text -> vectors.

Two kinds, one interface (:class:`Embedder`): fastembed's ONNX models in-process, or an
OpenAI-compatible ``/v1/embeddings`` server. Both are blocking libraries or slow calls, so
the proxy reaches them through :class:`BatchingEmbedder`, which runs them on a worker thread
and folds the queries that arrive while one batch runs into the next.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import httpx
import numpy as np

from ..policy import EmbedderPolicy
from ..workers import threads_per_worker
from .database import state_directory

log = logging.getLogger("dreamseed.rag")


class EmbedderError(Exception):
    """The embedder cannot be loaded or did not answer; RAG degrades, the request goes on."""


class Embedder(Protocol):
    model: str
    dim: int
    # Whether embedding runs on this machine's cores (a model in process) or waits on another
    # machine (an embedding server): retrieval overlaps the lexical leg with the embedding only then.
    uses_local_cores: bool

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text (blocking)."""
        ...

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in the model's tokens, before any cut (blocking)."""
        ...

    def shorten(self, text: str, max_tokens: int) -> str:
        """``text`` if it has at most ``max_tokens`` tokens, else its beginning and its end, about
        ``max_tokens`` tokens in all (a question is usually at one end of a long message)."""
        ...


def _head_and_tail(text: str, spans: Sequence[tuple[int, int]], max_tokens: int) -> str:
    """Cut ``text`` to its first and last max_tokens/2 tokens, given each token's character span."""
    if len(spans) <= max_tokens:
        return text
    half = max_tokens // 2
    return f"{text[:spans[half - 1][1]]} … {text[spans[len(spans) - half][0]:]}"


def model_folder_name(model: str) -> str:
    return model.replace("/", "--")


def local_model_path(policy: EmbedderPolicy, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The local folder to load the model from, if any: the configured one (relative to the
    state directory), or the one `dreamseed rag setup-model` writes, if present."""
    state = state_directory(environ)
    if policy.model_path:
        path = Path(policy.model_path)
        return path if path.is_absolute() else state / path
    default = state / "models" / model_folder_name(policy.model)
    return default if (default / "tokenizer.json").exists() else None


def _known_fastembed_dim(model: str) -> int | None:
    from fastembed import TextEmbedding

    for description in TextEmbedding.list_supported_models():
        if description["model"].lower() == model.lower():
            return int(description["dim"])
    return None


class FastEmbedder:
    uses_local_cores = True

    def __init__(self, policy: EmbedderPolicy, environ: Mapping[str, str] = os.environ) -> None:
        from fastembed import TextEmbedding
        from fastembed.common.model_description import ModelSource, PoolingType

        self.model = policy.model
        path = local_model_path(policy, environ)
        known_dim = _known_fastembed_dim(policy.model)
        if known_dim is None:
            if path is None or policy.dim is None:
                raise EmbedderError(
                    f"fastembed does not know the model {policy.model!r}: give `model_path` (a local folder with "
                    "model.onnx and tokenizer.json) and `dim` in rag.yaml")
            try:
                TextEmbedding.add_custom_model(
                    model=policy.model, pooling=PoolingType.MEAN if policy.pooling == "mean" else PoolingType.CLS,
                    normalization=True, sources=ModelSource(hf=policy.model), dim=policy.dim, model_file="model.onnx")
            except ValueError:
                pass  # registered already (a second embedder in this process)
        self.dim = known_dim or int(policy.dim or 0)
        if policy.dim is not None and known_dim is not None and policy.dim != known_dim:
            raise EmbedderError(f"rag.yaml says dim {policy.dim}, but {policy.model} makes {known_dim}-d vectors")
        if path is not None and not (path / "model.onnx").exists() and not any(path.glob("*.onnx")):
            raise EmbedderError(f"no ONNX model in {path}: run `dreamseed rag setup-model` or fix embedder.model_path")
        try:
            # No ONNX Runtime memory arena: with one, the process keeps the largest batch's buffers for
            # good; without, memory goes back to its baseline after a large request, at no cost that
            # shows for MiniLM on CPU (benchmarks/test_embedding_memory.py).
            # With `serve --workers N`, each worker's session gets its share of the cores.
            threads = threads_per_worker(environ)
            if path is not None:
                self._model = TextEmbedding(policy.model, specific_model_path=str(path), enable_cpu_mem_arena=False,
                                            threads=threads)
            else:
                self._model = TextEmbedding(policy.model, cache_dir=str(state_directory(environ) / "models" / "cache"),
                                            enable_cpu_mem_arena=False, threads=threads)
        except Exception as exc:  # fastembed raises plain exceptions for missing files and failed downloads
            where = f"from {path}" if path else "from the model hub (unreachable? run `dreamseed rag setup-model`)"
            raise EmbedderError(f"cannot load embedding model {policy.model!r} {where}: {exc}") from exc
        self.batch_size = policy.batch_size
        # Text is cut at the model's maximum sequence length before it reaches the model: fastembed's
        # tokenizer cuts at 512, twice MiniLM's 256, and memory grows with the largest batch x length
        # run. /v1/embeddings refuses longer inputs before this (see api/embeddings.py).
        tokenizer = getattr(getattr(self._model, "model", None), "tokenizer", None)
        self._counter = None
        if tokenizer is not None:
            from tokenizers import Tokenizer

            tokenizer.enable_truncation(max_length=policy.max_input_tokens)
            self._counter = Tokenizer.from_str(tokenizer.to_str())  # a copy that counts without cutting
            self._counter.no_truncation()
            self._counter.no_padding()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = list(self._model.embed(list(texts), batch_size=self.batch_size))
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        if self._counter is None:
            return [max(1, len(t) // 4) for t in texts]
        return [len(encoding.ids) for encoding in self._counter.encode_batch(list(texts))]

    def shorten(self, text: str, max_tokens: int) -> str:
        if self._counter is None:
            return _head_and_tail(text, _character_spans(text), max_tokens * 4)
        return _head_and_tail(text, self._counter.encode(text, add_special_tokens=False).offsets, max_tokens)


class OpenAIEmbedder:
    """Calls an OpenAI-compatible /v1/embeddings (vLLM's embedding server, say)."""

    uses_local_cores = False

    def __init__(self, policy: EmbedderPolicy, environ: Mapping[str, str] = os.environ) -> None:
        url = (environ.get(policy.url_env) if policy.url_env else None) or policy.url
        if not url:
            raise EmbedderError(f"embedder URL not configured: set {policy.url_env}")
        headers = {}
        if policy.api_key_env and environ.get(policy.api_key_env):
            headers["authorization"] = f"Bearer {environ[policy.api_key_env]}"
        self.model = policy.model
        self.dim = int(policy.dim or 0)
        self.batch_size = policy.batch_size
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=policy.timeout)
        self._tokens = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            try:
                response = self._client.post("/v1/embeddings", json={"model": self.model, "input": batch})
                response.raise_for_status()
                data = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise EmbedderError(f"embedding server failed: {exc}") from exc
            ordered = sorted(data["data"], key=lambda item: item["index"])
            rows += [item["embedding"] for item in ordered]
            self._tokens = int(data.get("usage", {}).get("prompt_tokens", 0))
        matrix = np.asarray(rows, dtype=np.float32)
        if matrix.shape != (len(texts), self.dim):
            raise EmbedderError(f"embedding server returned shape {matrix.shape}, expected ({len(texts)}, {self.dim})")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norms == 0, 1, norms)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        # The server's tokenizer is not here: an estimate (it enforces its own limit).
        return [max(1, len(t) // 4) for t in texts]

    def shorten(self, text: str, max_tokens: int) -> str:
        return _head_and_tail(text, _character_spans(text), max_tokens * 4)  # about 4 characters a token


def _character_spans(text: str) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(len(text))]


def load_embedder(policy: EmbedderPolicy, environ: Mapping[str, str] = os.environ) -> Embedder:
    if policy.kind == "openai":
        return OpenAIEmbedder(policy, environ)
    return FastEmbedder(policy, environ)


def _malloc_trim() -> Callable[[int], object] | None:
    try:
        trim: Callable[[int], object] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give memory freed after a large embedding run back to the system. glibc keeps a thread's
    freed heap for reuse: after maximum-size /v1/embeddings requests the proxy stayed ~260 MB
    above its baseline until this; malloc_trim takes a few milliseconds after each bulk run."""
    if _TRIM is not None:
        _TRIM(0)


class BatchingEmbedder:
    """Async front of a blocking embedder. Queries (retrieval for routed requests) run on one
    worker thread; those that arrive while a batch is running wait together and go in the next
    call (one ONNX run for many queries). Bulk work (/v1/embeddings, ingestion) runs on a thread
    of its own, so a large batch never holds up the queries behind their time budget (ONNX
    Runtime sessions may be run from several threads at once)."""

    def __init__(self, embedder: Embedder, max_batch: int = 64, max_query_tokens: int | None = None) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_query_tokens = max_query_tokens
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-queries")
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder-bulk")
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running = False

    def _embed_queries(self, texts: list[str]) -> np.ndarray:
        if self.max_query_tokens is not None:
            texts = [self.embedder.shorten(text, self.max_query_tokens) for text in texts]
        return self.embedder.embed(texts)

    async def embed_one(self, text: str) -> np.ndarray:
        """One query's vector (shortened to ``max_query_tokens`` first, on the worker thread)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """Many texts' vectors, one model batch per call to the bulk thread: a cancelled caller (an
        interrupted ingestion) leaves the thread at most one batch of work, not the whole list."""
        loop = asyncio.get_running_loop()
        step = max(getattr(self.embedder, "batch_size", 32), 1)
        texts = list(texts)
        try:
            parts = [await loop.run_in_executor(self._bulk, self.embedder.embed, texts[start:start + step])
                     for start in range(0, len(texts), step)]
            return np.concatenate(parts) if parts else np.empty((0, self.embedder.dim), dtype=np.float32)
        finally:
            await loop.run_in_executor(self._bulk, release_freed_memory)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                live = [(text, future) for text, future in batch if not future.done()]  # drop abandoned waits
                if not live:
                    continue
                try:
                    vectors = await loop.run_in_executor(self._executor, self._embed_queries, [t for t, _ in live])
                except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc if isinstance(exc, EmbedderError) else EmbedderError(str(exc)))
                    continue
                for (_, future), vector in zip(live, vectors, strict=True):
                    if not future.done():
                        future.set_result(vector)
        finally:
            self._running = False

    def close(self) -> None:
        for executor in (self._executor, self._bulk):
            executor.shutdown(wait=False, cancel_futures=True)
