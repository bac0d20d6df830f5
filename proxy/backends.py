"""Live connections to the backends in the catalog: one pooled ``httpx.AsyncClient`` each.

Clients are built once at startup and closed at shutdown. The pool size is the backend's
``max_concurrency``, so the proxy never sends a backend more requests than it can take.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from .policy import Backend, Catalog

log = logging.getLogger("dreamseed.backends")

# vLLM's HTTP server (uvicorn) closes idle keep-alive connections after 5 s. Expiring ours
# sooner means we never send a request down a socket the server is about to close.
KEEPALIVE_EXPIRY_S = 4.0


@dataclass(slots=True)
class Upstream:
    name: str
    backend: Backend
    url: str | None
    client: httpx.AsyncClient | None
    # Why this backend cannot be used at all (e.g. its URL is not configured); None if usable.
    unavailable: str | None = None


def build_client(backend: Backend, url: str, environ: Mapping[str, str]) -> httpx.AsyncClient:
    t = backend.timeouts
    headers = {"accept-encoding": "identity"}  # relay bytes as the backend sent them
    if backend.api_key_env and environ.get(backend.api_key_env):
        headers["authorization"] = f"Bearer {environ[backend.api_key_env]}"
    return httpx.AsyncClient(
        base_url=url,
        headers=headers,
        timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        limits=httpx.Limits(
            max_connections=backend.max_concurrency,
            max_keepalive_connections=backend.max_concurrency,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        ),
        # Never let HTTP_PROXY or similar settings reroute traffic meant for our own backends.
        trust_env=False,
    )


class Upstreams:
    """All backends, by name."""

    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        self._by_name = upstreams

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        environ: Mapping[str, str] | None = None,
        url_overrides: Mapping[str, str] | None = None,
    ) -> Upstreams:
        environ = os.environ if environ is None else environ
        overrides = url_overrides or {}
        upstreams: dict[str, Upstream] = {}
        for name, backend in catalog.backends.items():
            url = overrides.get(name) or backend.resolve_url(environ)  # type: ignore[arg-type]
            if url is None:
                why = f"no URL: set {backend.url_env}" if backend.url_env else "no URL configured"
                log.warning("backend %s is unavailable (%s)", name, why)
                upstreams[name] = Upstream(name, backend, None, None, why)
            else:
                upstreams[name] = Upstream(name, backend, url, build_client(backend, url, environ))
        return cls(upstreams)

    def __getitem__(self, name: str) -> Upstream:
        return self._by_name[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    async def aclose(self) -> None:
        for upstream in self._by_name.values():
            if upstream.client is not None:
                await upstream.client.aclose()
