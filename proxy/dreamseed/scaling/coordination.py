"""Mutual exclusion of starts and stops across proxy processes, and shared last use: a plain
asyncio lock for one process, file locks and file times for the workers of one `serve --workers N`
without a database, Postgres advisory locks and an activity table for processes sharing one."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg

log = logging.getLogger("dreamseed.scaling")


class Coordinator(Protocol):
    """Mutual exclusion of starts and stops across proxy processes, and shared last use."""

    def lock(self, name: str) -> AbstractAsyncContextManager[Any]: ...

    async def touch(self, name: str) -> None: ...

    async def seconds_since_use(self, name: str) -> float | None: ...

    async def aclose(self) -> None: ...


class LocalCoordinator:
    """One proxy process: an asyncio lock per backend, no shared activity."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def touch(self, name: str) -> None:
        pass

    async def seconds_since_use(self, name: str) -> float | None:
        return None

    async def aclose(self) -> None:
        pass


class HostCoordinator:
    """The workers of one `serve --workers N` with no database: an exclusive lock on a file per
    backend in the workers' shared directory (the kernel lets it go if the holder dies), and the
    backend's last use as another file's modification time."""

    POLL_S = 0.05  # starts and stops are rare and take seconds: polling the lock is cheap enough

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.local = LocalCoordinator()

    def _file(self, kind: str, name: str) -> Path:
        return self.directory / f"scale-{kind}-{name.encode('utf-8').hex()}"

    @asynccontextmanager
    async def lock(self, name: str) -> AsyncIterator[None]:
        async with self.local.lock(name):
            fd = os.open(self._file("lock", name), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(self.POLL_S)
                yield
            finally:
                os.close(fd)  # closing the file lets the lock go

    async def touch(self, name: str) -> None:
        path = self._file("used", name)
        try:
            # Made if missing, else its modification time set to now; in a thread, as every file
            # write of the proxy's (a metadata write on ext4 can wait milliseconds for the journal).
            await asyncio.to_thread(path.touch)
        except OSError as exc:
            log.warning("could not record activity of %s in %s: %s", name, self.directory, exc)

    async def seconds_since_use(self, name: str) -> float | None:
        try:
            return max(time.time() - self._file("used", name).stat().st_mtime, 0.0)
        except FileNotFoundError:
            return None

    async def aclose(self) -> None:
        pass


class _ClusterLock:
    """This process's lock for the backend, then Postgres's session-level advisory lock: one
    proxy process at a time starts or stops it. The advisory lock is held for the whole start or
    stop and goes with the connection if this process dies."""

    def __init__(self, coordinator: PostgresCoordinator, name: str) -> None:
        self.coordinator = coordinator
        self.local = coordinator.local.lock(name)
        self.key = f"dreamseed-scale:{name}"
        self.conn: Any = None

    async def __aenter__(self) -> None:
        await self.local.acquire()
        try:
            await self.coordinator.ensure_schema()
            self.conn = await psycopg.AsyncConnection.connect(self.coordinator.url, autocommit=True, connect_timeout=5)
            await self.conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.key,))
        except BaseException:
            if self.conn is not None:
                await self.conn.close()
            self.local.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.key,))
        finally:
            await self.conn.close()
            self.local.release()


class PostgresCoordinator:
    """Proxy processes sharing a database: only one starts or stops a backend at a time (the
    next one finds it running, or stopped), and idle stops honour every process's traffic."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.local = LocalCoordinator()
        self._ready = False

    async def ensure_schema(self) -> None:
        if self._ready:
            return
        async with await psycopg.AsyncConnection.connect(self.url, connect_timeout=5) as conn, conn.transaction():
            # Two processes creating the table at once would collide in the catalog: serialise them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('dreamseed-scale-schema'))")
            await conn.execute("CREATE TABLE IF NOT EXISTS dreamseed_backend_activity ("
                               " backend text PRIMARY KEY, last_request timestamptz NOT NULL)")
        self._ready = True

    async def aclose(self) -> None:
        pass  # every query above opens and closes its own connection

    def lock(self, name: str) -> _ClusterLock:
        return _ClusterLock(self, name)

    async def touch(self, name: str) -> None:
        try:
            await self.ensure_schema()
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(
                    "INSERT INTO dreamseed_backend_activity VALUES (%s, now()) ON CONFLICT (backend)"
                    " DO UPDATE SET last_request = greatest(dreamseed_backend_activity.last_request, now())", (name,))
        except Exception as exc:  # noqa: BLE001 - activity sharing is best effort
            log.warning("could not record activity of %s in the database: %s", name, exc)

    async def seconds_since_use(self, name: str) -> float | None:
        await self.ensure_schema()
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            row = await (await conn.execute(
                "SELECT extract(epoch FROM now() - last_request) FROM dreamseed_backend_activity WHERE backend = %s",
                (name,))).fetchone()
        return float(row[0]) if row else None


