"""POST /v1/embeddings: OpenAI's embeddings endpoint, answered by rag.yaml's embedder."""

from __future__ import annotations

import asyncio
import base64
import logging

import msgspec
from litestar.types import ASGIApp

from ..errors import ProxyError
from ..openai_api import TOKEN_IDS_REFUSED, EmbeddingRequest, decode_struct, storable, token_ids
from ..request_path import read_body
from ..service import Service
from .common import AnyRequest, authorization, json_response

log = logging.getLogger("dreamseed.embeddings")


async def create_embeddings(service: Service, request: AnyRequest) -> ASGIApp:
    """POST /v1/embeddings: rag.yaml's embedder, with OpenAI's limits and shapes."""
    service.keys.check(authorization(request), "client")
    body = await read_body(request.receive, -1)
    try:
        wanted = decode_struct(body, EmbeddingRequest)
    except ProxyError as exc:
        if (exc.param or "").startswith("input") and token_ids(msgspec.json.decode(body).get("input")):
            raise ProxyError("invalid_request", TOKEN_IDS_REFUSED, param="input") from None
        raise
    storable(wanted.input, "input")
    found = service.retriever()
    configured = service.runtime.current.policies.rag.embedder.model if found is None else found.rag.embedder.model
    if wanted.model != configured:
        raise ProxyError("model_not_found",
                         f"The embedding model {wanted.model!r} does not exist. Available models: {configured}",
                         param="model")
    if found is None or found.embedder is None:
        problem = "retrieval is off in rag.yaml" if found is None else found.problem
        raise ProxyError("embeddings_unavailable", f"embeddings are unavailable: {problem}")
    embedder = found.embedder
    if wanted.dimensions is not None and wanted.dimensions != embedder.embedder.dim:
        raise ProxyError("invalid_dimensions", f"{configured} makes {embedder.embedder.dim}-dimensional vectors; "
                         f"`dimensions` {wanted.dimensions} is not available", param="dimensions")
    texts = [wanted.input] if isinstance(wanted.input, str) else wanted.input
    limits = found.rag.embedder
    counts = await asyncio.get_running_loop().run_in_executor(None, embedder.embedder.token_counts, texts)
    for index, count in enumerate(counts):
        if count > limits.max_input_tokens:
            where = "input" if isinstance(wanted.input, str) else f"input[{index}]"
            raise ProxyError("input_too_long", f"`{where}` is {count} tokens; {configured} takes at most "
                             f"{limits.max_input_tokens} (rag.yaml embedder.max_input_tokens)", param=where)
    tokens = sum(counts)
    if tokens > limits.max_request_tokens:
        raise ProxyError("input_too_long", f"the inputs are {tokens} tokens in all; one request may have at most "
                         f"{limits.max_request_tokens} (rag.yaml embedder.max_request_tokens)", param="input")
    if service.embeddings_pending >= limits.max_pending:
        raise ProxyError("embeddings_busy", f"{service.embeddings_pending} embedding requests are already running "
                         "(rag.yaml embedder.max_pending); retry shortly", headers={"retry-after": "1"})
    service.embeddings_pending += 1
    try:
        if len(texts) == 1:
            vectors = [await embedder.embed_one(texts[0])]
        else:
            vectors = list(await embedder.embed_many(texts))
    except Exception as exc:  # noqa: BLE001 - the embedder's failure is a 503, not a 500
        log.warning("embedding failed: %s", exc)
        raise ProxyError("embeddings_unavailable", f"the embedder failed: {exc}") from None
    finally:
        service.embeddings_pending -= 1
    data = [{"object": "embedding", "index": index,
             "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
             if wanted.encoding_format == "base64" else vector.tolist()}
            for index, vector in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": configured,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
