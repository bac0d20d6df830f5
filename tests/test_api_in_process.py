"""In-process API tests: Litestar's test client over the same app `dreamseed serve` runs, for
checks that need no separate process (the real-process tests stay where processes matter)."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from dreamseed.asgi import create_app
from dreamseed.errors import ERRORS
from dreamseed.policy import load_policies
from dreamseed.request_path import CLIENT_GONE
from support import ROOT, free_port, request_scope, running, start_sim, write_policies


@pytest.fixture
def app(tmp_path: Path) -> Litestar:
    backends = {"general": {"url": f"http://127.0.0.1:{free_port()}", "model": "m", "context_length": 1024}}
    policies = load_policies(write_policies(tmp_path, backends, {"rules": [{"name": "default", "target": "general"}]}))
    return create_app(policies, environ={"DREAMSEED_ADMIN_KEY": "admin"}, watch_policies=False)


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    with TestClient(app) as test_client:
        yield test_client


def test_every_registered_route_is_in_the_openapi_document(app: Litestar, client: TestClient[Litestar]) -> None:
    document = client.get("/openapi.json").json()
    registered = {(route.path.replace("{name:str}", "{name}").replace("{action:str}", "{action}")
                   .replace("{model:path}", "{model}"), method.lower())
                  for route in app.routes for method in getattr(route, "methods", ()) if method not in ("HEAD", "OPTIONS")}
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert registered and registered <= described, sorted(registered - described)


def test_every_error_code_the_code_raises_is_catalogued_and_documented() -> None:
    raised: set[str] = set()
    for file in (ROOT / "proxy" / "dreamseed").rglob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            # ProxyError and bad_request take the code; the transport failures' table (Failure) holds its codes.
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("ProxyError", "bad_request", "Failure"):
                for literal in ast.walk(node.args[0] if getattr(node.func, "id", None) == "ProxyError" and node.args
                                        else node):
                    if isinstance(literal, ast.Constant) and isinstance(literal.value, str) and \
                            re.fullmatch(r"[a-z_]+", literal.value) and literal.value in ERRORS:
                        raised.add(literal.value)
    assert {"model_not_found", "backend_busy", "invalid_json", "backend_unreachable"} <= raised
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for code in ERRORS:
        assert f"| `{code}` |" in api, f"{code} is missing from docs/api.md: run `dreamseed docs --write`"


def test_errors_take_status_and_type_from_the_catalogue(client: TestClient[Litestar]) -> None:
    unknown = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == ERRORS["model_not_found"].status
    assert unknown.json()["error"] == {**unknown.json()["error"], "type": ERRORS["model_not_found"].type,
                                       "code": "model_not_found", "param": "model"}
    assert client.post("/v1/chat/completions", content=b"{").json()["error"]["code"] == "invalid_json"
    assert client.get("/no/such/route").json()["error"]["code"] == "not_found"
    assert client.delete("/healthz").status_code == ERRORS["method_not_allowed"].status


def test_admin_routes_share_one_guard(client: TestClient[Litestar]) -> None:
    for method, path in (("GET", "/admin/backends"), ("GET", "/admin/policies"), ("POST", "/admin/policies/reload"),
                         ("GET", "/admin/rag"), ("POST", "/admin/backends/general/start")):
        missing = client.request(method, path)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key", path
        wrong = client.request(method, path, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key", path
    assert client.get("/admin/backends", headers={"authorization": "Bearer admin"}).status_code == 200


def test_readyz_and_admin_backends_share_one_view_of_backend_state(client: TestClient[Litestar]) -> None:
    # The first probe of the (unreachable) backend decides its state; until then it is unknown, and
    # the probe can land between the two calls below (a CI run read unknown, then failing).
    deadline = time.monotonic() + 10
    while client.get("/readyz").json()["backends"]["general"]["state"] == "unknown" and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = client.get("/readyz").json()
    admin = client.get("/admin/backends", headers={"authorization": "Bearer admin"}).json()
    assert ready["backends"].keys() == admin["backends"].keys() == {"general"}
    assert ready["backends"]["general"]["state"] == admin["backends"]["general"]["state"] == "failing"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "auto"}, "messages"),
    ({"model": "auto", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"model": "auto", "messages": []}, "messages"),
])
def test_a_missing_or_wrong_field_is_named_in_param(client: TestClient[Litestar], body: dict[str, object],
                                                     param: str) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_deeply_nested_metadata_in_an_admin_ingest_is_a_400(client: TestClient[Litestar]) -> None:
    deep = b'{"collection": "c", "documents": [{"source": "s", "text": "t", "metadata": {"a": ' + \
        b"[" * 5000 + b"]" * 5000 + b"}}]}"
    response = client.post("/admin/rag/ingest", content=deep, headers={"authorization": "Bearer admin"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_relayed_routes_answer_alike_on_the_direct_path_and_through_litestar(client: TestClient[Litestar],
                                                                            path: str) -> None:
    """POST to a relayed path goes straight to the relay (ProxyApp); the same path with a
    trailing slash goes through Litestar's router to the same handler. Both must answer the same
    way: an OpenAI-shaped error with the request id, the rule, and the request counted."""
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    answers = [client.post(p, json=body, headers={"x-request-id": f"req-{i}"}) for i, p in enumerate((path, path + "/"))]
    for index, answer in enumerate(answers):
        assert answer.status_code == ERRORS["model_not_found"].status, answer.text
        assert answer.json()["error"]["code"] == "model_not_found"
        assert answer.headers["x-request-id"] == f"req-{index}"
    counted = client.get("/metrics").text
    assert 'dreamseed_requests_total{backend="none",rule="none",status="404"} 2.0' in counted, counted
    # Other methods on the relayed paths are Litestar's: 405 in the OpenAI shape.
    refused = client.get(path)
    assert refused.status_code == 405 and refused.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("server_tells", [True, False], ids=["client_gone-extension", "receive-only"])
def test_a_stream_whose_client_left_stops_its_backend_whichever_way_the_server_says_so(
        tmp_path: Path, server_tells: bool) -> None:
    """`dreamseed serve` calls back when a client's connection is lost (the CLIENT_GONE scope
    extension, server.py); any other ASGI server only answers `receive` with http.disconnect. Either
    way the stream stops and the backend's generation is cancelled."""
    sim = start_sim("m", tokens=400, token_delay=0.02)
    try:
        policies = load_policies(write_policies(tmp_path, {"general": {"url": sim.url, "model": "m", "context_length": 4096}},
                                                {"rules": [{"name": "default", "target": "general"}]}))
        app = create_app(policies, environ={}, watch_policies=False)
        body = json.dumps({"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
        registered: list[Callable[[], None] | None] = []
        receives = 0

        async def run() -> int:
            nonlocal receives
            left = asyncio.Event()
            chunks = 0

            async def receive() -> dict[str, Any]:
                nonlocal receives
                receives += 1
                if receives == 1:
                    return {"type": "http.request", "body": body, "more_body": False}
                await left.wait()  # a server without the extension says so here, and only here
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                nonlocal chunks
                if message["type"] == "http.response.body" and message.get("body"):
                    chunks += 1
                    if chunks == 3:  # the client leaves mid-stream
                        left.set()
                        if server_tells:
                            callback = registered[-1]
                            assert callback is not None
                            callback()  # what server.py's protocol does when the connection is lost

            scope = request_scope(body)
            if server_tells:
                scope["extensions"] = {CLIENT_GONE: {"register": registered.append}}
            async with running(app):  # type: ignore[arg-type]
                await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[arg-type]
            return chunks

        chunks = asyncio.run(run())
        assert chunks < 10  # stopped soon after the client left, not after 400 tokens
        stats = sim.wait_for(lambda s: s["cancelled"] == 1 and s["active"] == 0)
        assert stats["cancelled"] == 1 and stats["active"] == 0 and stats["finished"] == 0
        if server_tells:
            # Registered once, withdrawn when the stream ended, and no task waited on receive.
            assert registered[0] is not None and registered[-1] is None and receives == 1
        else:
            assert registered == [] and receives == 2
    finally:
        sim.stop()
