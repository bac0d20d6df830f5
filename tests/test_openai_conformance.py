"""The proxy's answers against OpenAI's published specification (tests/data/openai-openapi: the
response schemas of openai/openai-openapi 2.3.0, MIT): models, chat and text completions streamed
and not, embeddings, and errors, the proxy's own and the backends' in vLLM's and llama.cpp's shapes.
A regression against the published API fails here."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from dreamseed.request_path.backend_errors import openai_error
from support import ROOT, Process, Sim, reply, start_proxy, start_sim, write_policies, write_rag


def nullable_as_json_schema(schema: Any) -> Any:
    """OpenAI's 3.1 document still marks null-permitted fields with OpenAPI 3.0's `nullable: true`,
    which JSON Schema ignores: read it as JSON Schema's null type, as the document means."""
    if isinstance(schema, list):
        return [nullable_as_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: nullable_as_json_schema(value) for key, value in schema.items() if key != "nullable"}
    if schema.get("nullable") is True:
        if isinstance(converted.get("type"), str):
            converted["type"] = [converted["type"], "null"]
            if "enum" in converted:
                converted["enum"] = [*converted["enum"], None]
        else:
            converted = {"anyOf": [converted, {"type": "null"}]}
    return converted


SPEC = json.loads((ROOT / "tests" / "data" / "openai-openapi" / "schemas.json").read_text(encoding="utf-8"))
SCHEMAS = nullable_as_json_schema(SPEC["schemas"])
# The document describes a streamed text completion with the completion object itself, whose
# finish_reason is a string; streams (OpenAI's own too) send null until the last chunk.
_COMPLETION = json.dumps(SCHEMAS["CreateCompletionResponse"])
SCHEMAS["CompletionChunk"] = nullable_as_json_schema(json.loads(
    _COMPLETION.replace('"finish_reason": {', '"finish_reason": {"nullable": true, ')))
CODER = "Qwen/Qwen2.5-Coder-7B-Instruct"  # a model id with a slash, as the catalog's are


def validate(instance: Any, schema: str) -> None:
    """Raise unless `instance` matches the named schema of OpenAI's specification."""
    jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}",
                                     "components": {"schemas": SCHEMAS}}).validate(instance)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    chunks = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    return [json.loads(chunk) for chunk in chunks[:-1]]


class ErrorShapes(BaseHTTPRequestHandler):
    """A backend answering every request with one error body: vLLM's (old and new shapes), llama.cpp's,
    or plain text, chosen by the request's model."""

    BODIES = {
        "vllm-flat": (400, b'{"object": "error", "message": "max_tokens must be at least 1, got 0.", '
                           b'"type": "BadRequestError", "param": "max_tokens", "code": 400}', "application/json"),
        "vllm-nested": (404, b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", '
                             b'"param": null, "code": 404}}', "application/json"),
        "llama": (400, b'{"error": {"code": 400, "message": "the request exceeds the available context size", '
                       b'"type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 2048}}',
                  "application/json; charset=utf-8"),
        "plain": (503, b"upstream overloaded", "text/plain"),
    }

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        status, answer, media = self.BODIES[body["model"]]
        reply(self, status, answer, media)

    def do_GET(self) -> None:
        reply(self, 200, b"{}", "application/json")

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Setup:
    proxy: Process
    sim: Sim

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.proxy.url}{path}", json=body, timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    sim = start_sim(CODER, tokens=6)
    errors = ThreadingHTTPServer(("127.0.0.1", 0), ErrorShapes)
    threading.Thread(target=errors.serve_forever, daemon=True).start()
    error_url = f"http://127.0.0.1:{errors.server_address[1]}"
    directory = tmp_path_factory.mktemp("conformance")
    backends: dict[str, Any] = {"code": {"url": sim.url, "model": CODER, "context_length": 4096}}
    for name in ErrorShapes.BODIES:
        backends[name] = {"url": error_url, "model": name, "context_length": 4096, "retries": 0}
    routing = {"rules": [{"name": "coding", "match": {"models": ["coder-alias"]}, "target": "code"},
                         {"name": "default", "target": "code"}]}
    policies = write_policies(directory / "p", backends, routing)
    write_rag(policies, {"defaults": {"enabled": True}})  # /v1/embeddings answers from the RAG embedder
    proxy = start_proxy(policies)
    yield Setup(proxy, sim)
    proxy.stop()
    sim.stop()
    errors.shutdown()


HELLO = [{"role": "user", "content": "안녕하세요, say hello"}]


def test_models_and_each_model_match_the_specification(setup: Setup) -> None:
    listed = httpx.get(f"{setup.proxy.url}/v1/models").json()
    validate(listed, "ListModelsResponse")
    ids = [model["id"] for model in listed["data"]]
    # Everything accepted as `model` is listed: auto, the rules' aliases, each backend and the model it serves.
    assert {"auto", "coder-alias", "code", CODER} <= set(ids)
    assert all(model["created"] > 1_700_000_000 for model in listed["data"])  # when the policies were loaded
    for model_id in ids:
        found = httpx.get(f"{setup.proxy.url}/v1/models/{model_id}")
        assert found.status_code == 200, (model_id, found.text)
        validate(found.json(), "Model")
        assert found.json()["id"] == model_id
        assert setup.post("/v1/chat/completions", {"model": model_id, "messages": HELLO, "max_tokens": 2}).status_code \
            in (200, 400, 404, 503)  # accepted as a model (the error backends answer with their errors)
    missing = httpx.get(f"{setup.proxy.url}/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    validate(missing.json(), "ErrorResponse")


def test_the_official_sdk_retrieves_each_model(setup: Setup) -> None:
    client = openai.OpenAI(base_url=f"{setup.proxy.url}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(CODER).id == CODER
    assert client.models.retrieve("auto").owned_by == "dreamseed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completions_match_the_specification_streamed_and_not(setup: Setup) -> None:
    answer = setup.post("/v1/chat/completions", {"model": "auto", "messages": HELLO, "max_tokens": 4})
    validate(answer.json(), "CreateChatCompletionResponse")
    with_logprobs = setup.post("/v1/chat/completions", {"model": "code", "messages": HELLO, "logprobs": True,
                                                        "top_logprobs": 2, "n": 2, "temperature": 0.7})
    validate(with_logprobs.json(), "CreateChatCompletionResponse")
    streamed = setup.post("/v1/chat/completions", {"model": "auto", "messages": HELLO, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    chunks = events(streamed)
    assert len(chunks) > 2
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")


def test_text_completions_match_the_specification_streamed_and_not(setup: Setup) -> None:
    validate(setup.post("/v1/completions", {"model": "auto", "prompt": "Hello", "max_tokens": 3}).json(),
             "CreateCompletionResponse")
    validate(setup.post("/v1/completions", {"model": "auto", "prompt": "Hello", "logprobs": 2}).json(),
             "CreateCompletionResponse")
    for chunk in events(setup.post("/v1/completions", {"model": "auto", "prompt": "Hello", "stream": True})):
        validate(chunk, "CompletionChunk")  # the completion object, finish_reason null until the end


def test_a_null_prompt_is_openais_default(setup: Setup) -> None:
    answer = setup.post("/v1/completions", {"model": "auto", "prompt": None, "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    assert setup.sim.stats()["last_body"]["prompt"] == "<|endoftext|>"


def test_embeddings_match_the_specification(setup: Setup) -> None:
    model = httpx.get(f"{setup.proxy.url}/openapi.json").json()["components"]["schemas"]["EmbeddingRequest"][
        "properties"]["model"]["enum"][0]
    answer = setup.post("/v1/embeddings", {"model": model, "input": ["one", "two"]})
    assert answer.status_code == 200, answer.text
    validate(answer.json(), "CreateEmbeddingResponse")


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", -5), ("max_tokens", 0), ("max_completion_tokens", -5), ("temperature", 2.5), ("temperature", -3),
    ("top_p", 1.5), ("n", 129), ("n", 0), ("presence_penalty", 2.5), ("frequency_penalty", -2.5),
    ("top_logprobs", 21), ("logit_bias", {"50256": 101}), ("stop", ["a", "b", "c", "d", "e"]),
])
def test_out_of_range_fields_are_refused_before_any_backend_sees_them(setup: Setup, field: str, value: Any) -> None:
    before = setup.sim.stats()["requests"]
    answer = setup.post("/v1/chat/completions", {"model": "code", "messages": HELLO, field: value})
    assert answer.status_code == 400, answer.text
    validate(answer.json(), "ErrorResponse")
    assert answer.json()["error"]["param"].startswith(field) and answer.json()["error"]["code"] == "invalid_request"
    assert setup.sim.stats()["requests"] == before


@pytest.mark.parametrize(("field", "value"), [("max_tokens", 0), ("best_of", 21), ("logprobs", 6), ("temperature", 3)])
def test_out_of_range_completion_fields_are_refused(setup: Setup, field: str, value: Any) -> None:
    answer = setup.post("/v1/completions", {"model": "code", "prompt": "x", field: value})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == field
    validate(answer.json(), "ErrorResponse")


@pytest.mark.parametrize("backend", list(ErrorShapes.BODIES))
def test_a_backends_own_error_reaches_the_client_in_openais_shape(setup: Setup, backend: str) -> None:
    status, raw, _ = ErrorShapes.BODIES[backend]
    answer = setup.post("/v1/chat/completions", {"model": backend, "messages": HELLO})
    assert answer.status_code == status and answer.headers["content-type"] == "application/json"
    assert answer.headers["x-dreamseed-backend"] == backend
    validate(answer.json(), "ErrorResponse")
    error = answer.json()["error"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["code"] is None or isinstance(error["code"], str)
    decoded = json.loads(raw) if raw.startswith(b"{") else None
    kept = raw.decode() if decoded is None else decoded.get("message") or decoded["error"]["message"]
    assert error["message"] == kept  # the backend's own words


def test_error_shapes_are_mapped_as_documented() -> None:
    flat = json.loads(openai_error(400, ErrorShapes.BODIES["vllm-flat"][1]))["error"]
    assert flat == {"message": "max_tokens must be at least 1, got 0.", "type": "invalid_request_error",
                    "param": "max_tokens", "code": None}
    assert json.loads(openai_error(429, b'{"error": {"code": "busy", "message": "later"}}'))["error"] == {
        "message": "later", "type": "rate_limit_error", "param": None, "code": "busy"}
    assert json.loads(openai_error(403, b"{}"))["error"]["message"] == "the backend answered HTTP 403"
    assert json.loads(openai_error(502, b"x" * 5000))["error"]["message"] == "x" * 2000


def test_token_ids_as_embeddings_input_get_a_message_that_says_what_to_change(setup: Setup) -> None:
    for given in ([15339, 1917], [[15339, 1917], [40, 1097]]):
        answer = setup.post("/v1/embeddings", {"model": "any", "input": given})
        assert answer.status_code == 400
        validate(answer.json(), "ErrorResponse")
        message = answer.json()["error"]["message"]
        assert "token ids" in message and "check_embedding_ctx_length=False" in message
        assert answer.json()["error"]["param"] == "input"


def test_the_schemas_are_openais(tmp_path: Path) -> None:
    assert SPEC["version"] == "2.3.0" and SPEC["license"] == "MIT"
    assert (ROOT / "tests" / "data" / "openai-openapi" / "LICENSE").read_text().startswith("The MIT License")
    with pytest.raises(jsonschema.ValidationError):  # the check can fail: a code that is a number is refused
        validate({"error": {"message": "m", "type": "t", "param": None, "code": 400}}, "ErrorResponse")
