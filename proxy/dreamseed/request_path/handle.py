"""A routed request from its first byte to the response that answers it: authenticate, read and
check the body, route, let the scaler prune the chain, retrieve context, forward along the chain.
Every error on the way is answered in OpenAI's shape and counted like any other answer."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Protocol

from litestar.types import ASGIApp, Receive, Scope

from ..auth import KeyRing
from ..errors import ProxyError, error_body
from ..exchange import Exchange
from ..openai_api import Endpoint, parse_request, request_id
from ..policy import RagSettings
from ..rag.augment import EVAL_COLLECTION_PREFIX, augment, query_of
from ..routing import UnknownModelError
from .chain import forward
from .responses import BufferedResponse, raw_headers

if TYPE_CHECKING:
    from ..rag.retriever import Retriever
    from ..runtime import Generation, Runtime
    from ..scaling import Scaler

log = logging.getLogger("dreamseed.request")

MAX_BODY_BYTES = 10 * 1024 * 1024
# Client headers worth passing on; everything else (notably the client's Authorization, which is
# for the proxy) stays here.
FORWARDED_REQUEST_HEADERS = frozenset({b"user-agent", b"traceparent", b"tracestate"})


class Serving(Protocol):
    """What the request path needs of the running service (service.Service)."""

    keys: KeyRing
    log_prompts: bool
    scaler: Scaler | None

    @property
    def runtime(self) -> Runtime: ...

    def retriever(self) -> Retriever | None: ...

    def finished(self, exchange: Exchange) -> None: ...


async def read_body(receive: Receive, declared_length: int) -> bytes:
    """The request body, refusing more than MAX_BODY_BYTES (early, when Content-Length says so)."""
    if declared_length > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProxyError("client_disconnected", "the client disconnected while sending the request")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]  # litestar types it loosely
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large() -> ProxyError:
    return ProxyError("request_too_large", f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")


def error_answer(exc: ProxyError, headers: dict[str, str], exchange: Exchange) -> BufferedResponse:
    exchange.error = exc.code
    exchange.backend = exc.headers.get("x-dreamseed-backend", exchange.backend)
    return BufferedResponse(exc.status, raw_headers({"content-type": "application/json", **headers, **exc.headers}),
                            error_body(exc.message, type=exc.type, code=exc.code, param=exc.param), exchange)


def rag_as_asked(settings: RagSettings, asked: bytes) -> RagSettings:
    """The request header `x-dreamseed-rag`: `off` turns retrieval off for this request (what
    `dreamseed eval answers` compares against), `collection=NAME` retrieves from another collection
    with the rule's settings. Only evaluation collections (`eval-...`) may be named besides the
    rule's own: a client must not read documents a rule does not give it."""
    value = asked.decode("latin-1").strip()
    if value in ("off", "auto"):
        return dataclasses.replace(settings, enabled=False) if value == "off" else settings
    if value.startswith("collection="):
        collection = value.removeprefix("collection=").strip()
        if collection == settings.collection:
            return settings
        if collection.startswith(EVAL_COLLECTION_PREFIX) and len(collection) > len(EVAL_COLLECTION_PREFIX):
            return dataclasses.replace(settings, collection=collection)
        raise ProxyError("collection_not_allowed",
                         f"x-dreamseed-rag may name this rule's collection ({settings.collection!r}) or an evaluation "
                         f"collection ('{EVAL_COLLECTION_PREFIX}...'), not {collection!r}", param="x-dreamseed-rag")
    raise ProxyError("invalid_request", f"x-dreamseed-rag must be 'off', 'auto' or 'collection=NAME', not {value!r}",
                     param="x-dreamseed-rag")


class RequestPath:
    """The request path of one running service; `handle` serves one request."""

    def __init__(self, service: Serving) -> None:
        self.service = service
        self._rag_settings: dict[tuple[str, str, str], RagSettings] = {}

    async def handle(self, scope: Scope, receive: Receive, endpoint: Endpoint, path: str) -> ASGIApp:
        service = self.service
        # One pass over the raw ASGI headers: cheaper than building a Headers object.
        supplied_id: bytes | None = None
        authorization: bytes | None = None
        declared_length = -1
        rag_asked: bytes | None = None
        passed_on: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                supplied_id = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                declared_length = int(value) if value.isdigit() else -1
            elif name == b"x-dreamseed-rag":
                rag_asked = value
            elif name in FORWARDED_REQUEST_HEADERS:
                passed_on.append((name, value))
        headers = {"x-request-id": request_id(supplied_id.decode("latin-1") if supplied_id is not None else None)}
        exchange = Exchange(headers["x-request-id"], endpoint, on_finish=service.finished)
        # The generation in force when the request arrived serves it to the end, reloads or not.
        generation = service.runtime.current
        try:
            service.keys.check(authorization, "client")
            body = await read_body(receive, declared_length)
            payload, prompt, stream = parse_request(body, endpoint)
            try:
                decision = generation.router.route(payload["model"], prompt)
            except UnknownModelError as exc:
                raise ProxyError(
                    "model_not_found",
                    f"The model {exc.model!r} does not exist. Available models: {', '.join(exc.available)}",
                    param="model",
                ) from None
            headers["x-dreamseed-rule"] = exchange.rule = decision.rule
            if service.log_prompts:
                exchange.prompt = prompt.text("all")
            scaler = service.scaler
            if scaler is not None:  # no awaits on the hot path for features that are off
                decision = await scaler.prune_chain(decision, headers, exchange)
            settings = self._settings(generation, decision.rule, decision.backend)
            if rag_asked is not None:
                settings = rag_as_asked(settings, rag_asked)
            headers["x-dreamseed-rag"] = await self._retrieve_into(payload, endpoint, settings, exchange) \
                if settings.enabled else "off"
            return await forward(generation.upstreams, decision, path, payload, stream, headers, passed_on, exchange)
        except ProxyError as exc:
            return error_answer(exc, headers, exchange)
        except Exception:
            # A fault of ours: logged once with the request id, answered in the OpenAI shape, and
            # counted (status 500, error internal_error) like every other answer.
            log.exception("internal error on request %s", headers["x-request-id"])
            return error_answer(ProxyError("internal_error", "internal error in the proxy"), headers, exchange)

    def _settings(self, generation: Generation, rule: str, backend: str) -> RagSettings:
        """rag.yaml's settings for a rule and backend, worked out once per policy generation."""
        key = (generation.policy_hash, rule, backend)
        found = self._rag_settings.get(key)
        if found is None:
            if len(self._rag_settings) > 1024:  # old generations' entries
                self._rag_settings.clear()
            found = self._rag_settings[key] = generation.policies.rag.settings(rule, backend)
        return found

    async def _retrieve_into(self, payload: dict[str, object], endpoint: Endpoint, settings: RagSettings,
                             exchange: Exchange) -> str:
        """Retrieve for a request whose settings enable it and add the context; returns the
        x-dreamseed-rag value."""
        query = query_of(payload, endpoint)
        found = self.service.retriever()
        if query is None or found is None:
            return "off"
        retrieval = await found.retrieve(settings, query)
        exchange.rag, exchange.rag_seconds = retrieval.outcome, retrieval.seconds
        if retrieval.outcome == "degraded":
            return "degraded"
        exchange.rag_hits = augment(payload, endpoint, settings, query, retrieval.hits)
        return f"hits={exchange.rag_hits}"
