"""The public routes: OpenAI's endpoints through Litestar (the relayed POSTs normally take the short
way, asgi.py), the model list, the API document, and the operator's /metrics and probes."""

from __future__ import annotations

from urllib.parse import unquote

from litestar import get, post
from litestar.params import FromPath
from litestar.types import ASGIApp
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..errors import ProxyError
from ..openai_api import Endpoint
from ..policy import AUTO_MODEL
from ..request_path import BufferedResponse
from ..service import Service
from .common import AnyRequest, authorization, json_response, service_of
from .embeddings import create_embeddings

# The routed endpoints: path -> (endpoint kind, the backend path they are forwarded to).
RELAYED: dict[str, tuple[Endpoint, str]] = {
    "/v1/chat/completions": ("chat", "/v1/chat/completions"),
    "/v1/completions": ("completions", "/v1/completions"),
}


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: AnyRequest) -> ASGIApp:
    return await service_of(request).request_path.handle(request.scope, request.receive, "chat", "/v1/chat/completions")


@post("/v1/completions", status_code=200, summary="Create a text completion (OpenAI-compatible)")
async def completions(request: AnyRequest) -> ASGIApp:
    return await service_of(request).request_path.handle(request.scope, request.receive, "completions",
                                                         "/v1/completions")


def model_entries(service: Service) -> list[dict[str, object]]:
    """Every name the proxy accepts as `model`, as OpenAI's Model objects: `auto` and the aliases
    rules match on (routed by routing.yaml), each backend by its name and by the model id it serves
    (straight to it). `created` is when the policy generation in force was loaded."""
    generation = service.runtime.current
    catalog, router = generation.policies.catalog, generation.router
    created = int(generation.loaded_at)

    def entry(model_id: str, **extra: object) -> dict[str, object]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "dreamseed", **extra}

    entries = [entry(AUTO_MODEL, description="routed by policies/routing.yaml")]
    for name, backend in catalog.backends.items():
        served = {"root": backend.model, "max_model_len": backend.context_length, "on_demand": backend.on_demand}
        entries.append(entry(name, **served))
        if backend.model != name and router.direct.get(backend.model) == name:
            entries.append(entry(backend.model, parent=name, description=f"served by backend {name!r}", **served))
    entries += [entry(alias, description="routed by policies/routing.yaml (a rule's model alias)")
                for alias in sorted(router.aliases)]
    return entries


@get("/v1/models", summary="List the models (backends) and 'auto'")
async def list_models(request: AnyRequest) -> ASGIApp:
    service = service_of(request)
    service.keys.check(authorization(request), "client")
    return json_response({"object": "list", "data": model_entries(service)})


@get("/v1/models/{model:path}", summary="Retrieve one model (OpenAI's retrieveModel)")
async def retrieve_model(request: AnyRequest, model: FromPath[str]) -> ASGIApp:
    service = service_of(request)
    service.keys.check(authorization(request), "client")
    wanted = unquote(model.removeprefix("/"))  # model ids have slashes (Qwen/Qwen2.5-Coder-7B-Instruct)
    for found in model_entries(service):
        if found["id"] == wanted:
            return json_response(found)
    available = ", ".join(service.runtime.current.router.available_models())
    raise ProxyError("model_not_found", f"The model {wanted!r} does not exist. Available models: {available}",
                     param="model")


@post("/v1/embeddings", status_code=200, summary="Create embeddings (OpenAI-compatible)")
async def embeddings(request: AnyRequest) -> ASGIApp:
    return await create_embeddings(service_of(request), request)


@get("/openapi.json", summary="This API's OpenAPI document", include_in_schema=False)
async def openapi_json(request: AnyRequest) -> ASGIApp:
    service = service_of(request)
    service.keys.check(authorization(request), "client")  # it lists the models, as /v1/models does
    return BufferedResponse(200, [(b"content-type", b"application/json")], service.openapi())


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics_endpoint(request: AnyRequest) -> ASGIApp:
    service = service_of(request)
    service.check_operator(request.scope, authorization(request))
    return BufferedResponse(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], await service.metrics_text())


@get("/healthz", summary="Liveness: the proxy process is serving")
async def healthz() -> ASGIApp:
    return json_response({"status": "ok", "version": __version__})


@get("/readyz", summary="Readiness: a backend for the catch-all route is up")
async def readyz(request: AnyRequest) -> ASGIApp:
    service = service_of(request)
    backends = service.backend_states()
    # Ready when the catch-all rule (what "auto" traffic falls through to) can be served.
    ready = any(backends[name].state == "up" for name in service.runtime.current.router.rules[-1].chain)
    status = 200 if ready else 503
    # Any prober gets the answer; the backends' names and states only the internal listener, or a
    # client key once the main listener has keys. Error details name internal addresses and
    # actuators, so they stay behind the admin key (/admin/backends).
    if not service.internal(request.scope):
        try:
            service.keys.check(authorization(request), "client")
        except ProxyError:
            return json_response({"ready": ready}, status=status)
    states = {name: {"state": view.state, "circuit": view.circuit, "on_demand": view.on_demand}
              for name, view in backends.items()}
    return json_response({"ready": ready, "backends": states}, status=status)


ROUTES = [chat_completions, completions, embeddings, list_models, retrieve_model, openapi_json, metrics_endpoint, healthz,
          readyz]
