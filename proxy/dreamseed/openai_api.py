"""The parts of OpenAI's request shapes the proxy must understand, and nothing more.

A request is decoded once into a plain dict (so every field the client sent reaches the
backend untouched) and checked against these Structs for the fields routing relies on.
Bad input becomes a 400 that names the offending field.
"""

from __future__ import annotations

import re
from random import getrandbits
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .errors import ProxyError, bad_request
from .routing import Prompt


class ChatMessage(Struct):
    role: Annotated[str, Meta(min_length=1)]
    content: str | list[Any] | None = None


# The ranges OpenAI's API reference (openai/openai-openapi 2.3.0) gives the sampling fields, checked
# before any backend sees the request: a backend may take an out-of-range value differently (llama.cpp
# reads a negative token limit as "no limit", holding a slot for the whole context). Token limits
# must be at least 1, as OpenAI and vLLM answer.
TokenLimit = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
Choices = Annotated[int, Meta(ge=1, le=128)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
LogitBias = dict[str, Annotated[float, Meta(ge=-100, le=100)]]
Stop = str | Annotated[list[str], Meta(min_length=1, max_length=4)]


class Sampling(Struct, kw_only=True):
    """The bounded fields chat and text completions share (keyword-only, so the subclasses'
    required fields come first)."""

    max_tokens: TokenLimit | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    stop: Stop | None = None
    seed: int | None = None


class ChatRequest(Sampling):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool | None = False
    max_completion_tokens: TokenLimit | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class CompletionRequest(Sampling):
    model: Annotated[str, Meta(min_length=1)]
    # None is OpenAI's default prompt, <|endoftext|>: parse_request puts it in.
    prompt: str | list[Any] | None = None
    stream: bool | None = False
    best_of: Annotated[int, Meta(ge=0, le=20)] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None


ENDOFTEXT = "<|endoftext|>"  # OpenAI's default completions prompt: the start of a new document

# What OpenAI's clients send as embeddings input besides text: token ids of OpenAI's tokenizer
# (LangChain's OpenAIEmbeddings does by default). They mean nothing to another model's tokenizer.
TOKEN_IDS_REFUSED = (
    "`input` holds token ids; this server embeds text with its own model's tokenizer, so ids from "
    "another tokenizer cannot be embedded here. Send the text instead (LangChain's OpenAIEmbeddings: "
    "check_embedding_ctx_length=False)")


class EmbeddingRequest(Struct):
    model: Annotated[str, Meta(min_length=1)]
    # Text only: token-id arrays, which OpenAI also accepts, mean nothing to another tokenizer.
    input: (Annotated[str, Meta(min_length=1)]
            | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=2048)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(gt=0)] | None = None
    user: str | None = None


def token_ids(value: object) -> bool:
    """Whether an embeddings `input` is token ids: a list of integers, or of lists of integers."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    if isinstance(first, list):
        return bool(first) and all(isinstance(item, int) and not isinstance(item, bool) for item in first)
    return isinstance(first, int) and not isinstance(first, bool)


class IngestDocument(Struct):
    source: Annotated[str, Meta(min_length=1, max_length=1000)]
    text: str
    metadata: dict[str, Any] = {}


class IngestRequest(Struct):
    """POST /admin/rag/ingest: whole documents; the proxy chunks and embeds them."""

    collection: Annotated[str, Meta(min_length=1, max_length=200)]
    documents: Annotated[list[IngestDocument], Meta(min_length=1, max_length=1000)]


class SearchRequest(Struct):
    """POST /admin/rag/search: retrieval as a routed request would do it (rule/backend settings)."""

    query: Annotated[str, Meta(min_length=1)]
    collection: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    k: Annotated[int, Meta(ge=1, le=50)] = 5
    mode: Literal["vector", "lexical", "hybrid"] | None = None
    rule: str | None = None
    backend: str | None = None


Endpoint = Literal["chat", "completions"]

_PARAM = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _invalid(exc: msgspec.ValidationError) -> ProxyError:
    """A 400 whose `param` names the field: where msgspec says the problem is, and for a missing
    field the field itself (msgspec names only the object that lacks it)."""
    message = str(exc)
    at = _PARAM.search(message)
    path = at[1] if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing[1]}" if path else missing[1]
    return bad_request(message, param=path or None)


def _too_deep() -> ProxyError:
    # msgspec's decoder stops at Python's recursion limit (about 1,000 levels); no OpenAI request
    # nests anywhere near that, so this is a malformed body, not an internal error.
    return bad_request("the request body nests JSON too deeply", code="invalid_json")


def parse_request(body: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], Prompt, bool]:
    """Decode and check a request body; return the payload to forward, its routable prompt,
    and whether the client asked for a stream."""
    if not body:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(payload, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        if endpoint == "chat":
            chat = msgspec.convert(payload, ChatRequest)
            return payload, Prompt(messages=payload["messages"]), bool(chat.stream)
        completion = msgspec.convert(payload, CompletionRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    if completion.prompt is None:
        payload["prompt"] = ENDOFTEXT  # null or absent: OpenAI's default
    return payload, Prompt(prompt=payload["prompt"]), bool(completion.stream)


def decode_struct(body: bytes, schema: type[Any]) -> Any:
    """Decode a JSON body into ``schema``; bad input becomes a 400 naming the field."""
    if not body:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None


def storable(value: Any, param: str) -> None:
    """Text bound for PostgreSQL (or a tokenizer) must be valid UTF-8 without NUL characters:
    a 400 naming the field, rather than a failure deep in the database."""
    # Iterative, not recursive: metadata may nest as deeply as the decoder allows.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise bad_request(f"`{param}` contains a NUL character (\\u0000), which cannot be stored", param=param)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"`{param}` contains an unpaired UTF-16 surrogate, which is not valid Unicode text",
                                  param=param) from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(supplied: str | None) -> str:
    """Keep a client's x-request-id if it is a sane token, so its logs and ours line up;
    otherwise make one."""
    if supplied and _REQUEST_ID.match(supplied):
        return supplied
    # 128 random bits from the random module: an id to find a request by, not a secret, so no
    # system call for it on every request (Python reseeds the module in each forked worker).
    return f"{getrandbits(128):032x}"
