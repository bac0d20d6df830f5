"""The ASGI app the server runs: where every request enters.

POSTs to the relayed paths (/v1/chat/completions, /v1/completions) go straight to the request path
(request_path/), past Litestar's stack, which would cost more than the relay itself
(docs/decisions/relay-outside-litestar.md); every other request, and those paths in any other form
(another method, a trailing slash), goes through Litestar to the handlers in api/. A request on the
internal listener (`serve --metrics-port`) reaches /metrics, /healthz and /readyz only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse

from .api import RELAYED, ROUTES, AdminController
from .errors import ProxyError, error_body, handle_http_exception, handle_proxy_error, handle_unexpected
from .policy import Policies
from .request_path import MAX_BODY_BYTES
from .service import Service
from .slots import WorkerSlots

# What the internal listener serves: Prometheus's scrape and the probes.
INTERNAL_PATHS = ("/metrics", "/healthz", "/readyz")


class ProxyApp(Litestar):
    """The Litestar app, with the relayed routes taken straight to the request path."""

    def __init__(self, service: Service, **config: Any) -> None:
        super().__init__(state=State({"service": service}), **config)
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.service.internal(scope) and scope["path"] not in INTERNAL_PATHS:
                refused = ProxyError("not_found", f"the internal listener serves {', '.join(INTERNAL_PATHS)} only")
                await ASGIResponse(body=error_body(refused.message, type=refused.type, code=refused.code),
                                   status_code=refused.status, media_type="application/json")(scope, receive, send)
                return
            if scope["method"] == "POST":
                relayed = RELAYED.get(scope["path"])
                if relayed is not None:
                    response = await self.service.request_path.handle(scope, receive, *relayed)
                    await response(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def create_app(
    policies: Policies,
    *,
    environ: Mapping[str, str] | None = None,
    url_overrides: Mapping[str, str] | None = None,
    on_shutdown: Sequence[Callable[[], object]] = (),
    watch_policies: bool = True,
    log_prompts: bool = False,
    internal_port: int | None = None,
    slots: WorkerSlots | None = None,
) -> Litestar:
    """The proxy as an ASGI app: `serve` runs it under uvicorn; tests call it in process."""
    service = Service(policies, os.environ if environ is None else environ, url_overrides or {}, log_prompts,
                      internal_port, slots)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await service.start(watch_policies)
        try:
            yield
        finally:
            await service.aclose()
            for hook in on_shutdown:
                hook()

    return ProxyApp(
        service,
        route_handlers=[*ROUTES, AdminController],
        lifespan=[lifespan],
        exception_handlers={
            ProxyError: handle_proxy_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=None,  # openapi.py builds the document from the request Structs
        request_max_body_size=MAX_BODY_BYTES,
        logging_config=None,
        debug=False,
    )
