"""API keys: clients send `Authorization: Bearer <key>`.

Two kinds: client keys for the OpenAI endpoints, and admin keys for /admin/*. They come from
the environment (DREAMSEED_API_KEYS, comma- or space-separated; DREAMSEED_ADMIN_KEY) or from
secrets files (DREAMSEED_API_KEYS_FILE, DREAMSEED_ADMIN_KEY_FILE: one key per line, # for
comments). Only SHA-256 digests are kept, and a presented key is compared against every digest
in constant time. Keys never appear in logs or error messages.

Without client keys the OpenAI endpoints are open (the proxy then refuses to bind beyond
loopback unless told otherwise); without an admin key the admin API is disabled.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ProxyError

Kind = Literal["client", "admin"]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _split(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys += [k for k in line.replace(",", " ").split() if k]
    return keys


def _read_keys(environ: Mapping[str, str], variable: str) -> list[str]:
    keys = _split(environ.get(variable, ""))
    file = environ.get(f"{variable}_FILE")
    if file:
        try:
            keys += _split(Path(file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise SystemExit(f"dreamseed: cannot read {variable}_FILE {file}: {exc.strerror}") from None
    return keys


@dataclass(frozen=True)
class KeyRing:
    client: tuple[bytes, ...]
    admin: tuple[bytes, ...]

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> KeyRing:
        client = tuple(_digest(k.encode()) for k in _read_keys(environ, "DREAMSEED_API_KEYS"))
        admin = tuple(_digest(k.encode()) for k in _read_keys(environ, "DREAMSEED_ADMIN_KEY"))
        return cls(client=client, admin=admin)

    @property
    def clients_open(self) -> bool:
        return not self.client

    def _matches(self, digest: bytes, digests: tuple[bytes, ...]) -> bool:
        found = False
        for candidate in digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(digest, candidate)
        return found

    def check(self, authorization: bytes | None, kind: Kind) -> None:
        """Raise the right 401/403 unless `authorization` carries a key of this kind."""
        if kind == "client" and self.clients_open:
            return
        if kind == "admin" and not self.admin:
            raise ProxyError("admin_disabled", "the admin API is disabled: set DREAMSEED_ADMIN_KEY to enable it")
        if not authorization or not authorization[:7].lower() == b"bearer ":
            raise ProxyError("missing_api_key", "missing API key: send the header 'Authorization: Bearer <key>'",
                             headers={"www-authenticate": "Bearer"})
        digest = _digest(authorization[7:].strip())
        if self._matches(digest, self.admin if kind == "admin" else self.client):
            return
        if self._matches(digest, self.client if kind == "admin" else self.admin):
            wanted = "an admin key" if kind == "admin" else "a client key"
            raise ProxyError("wrong_key_kind", f"this key is valid but this endpoint needs {wanted}")
        raise ProxyError("invalid_api_key", "invalid API key", headers={"www-authenticate": "Bearer"})
