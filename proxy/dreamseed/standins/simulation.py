"""Stand in for backends that are not there, so the proxy runs end to end without GPUs.

Used by ``dreamseed serve --simulate-missing`` (a simulated vLLM for each missing backend) and
``dreamseed serve --local-model`` (llama.cpp's ``llama-server`` with a real small model, see
local_model.py). A backend that answers on its URL is left alone; for the others a stand-in
listens on the same local port (or a free one, for remote URLs) and the proxy is pointed at it.
Everything stood in for is announced as such.

On-demand backends (scale.yaml) are not started up front: their actuator is replaced by a
``command`` actuator that runs ``dreamseed stand-in start|stop|status``, so the scaler really
starts the stand-in on the first request that calls for it and stops it when idle, as it would
start and stop the real container.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from ..policy import CommandActuator, Policies, Scale
from .local_model import LocalModel, free_port

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_LISTENING = re.compile(r"listening on (http://\S+)")

# Timings that feel like a small model on a good GPU, so the demo streams visibly.
DEMO_KNOBS = ("--ttft", "0.05", "--token-delay", "0.02", "--tokens", "24")
# SmolLM2-135M was trained with an 8k context; a catalog's 128k would only cost memory here.
MAX_LOCAL_CONTEXT = 8192

Kind = Literal["simulated", "llama"]
LABEL: dict[Kind, str] = {"simulated": "SIMULATED", "llama": "LOCAL MODEL"}


@dataclass
class StandIn:
    name: str
    url: str
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None  # None: started on demand
    pidfile: Path | None = None
    restart: Callable[[], StandIn] | None = None  # starts a new one on the same port


SUPERVISE_S = 0.5
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


@dataclass
class StandIns:
    """What ``serve`` started or will start; ``stop`` ends all of it."""

    kind: Kind
    started: list[StandIn] = field(default_factory=list)
    on_demand: list[StandIn] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None

    @property
    def url_overrides(self) -> dict[str, str]:
        return {s.name: s.url for s in (*self.started, *self.on_demand)}

    def supervise(self, say: Callable[[str], None]) -> None:
        """Reap stand-ins that die and restart them on their port, with backoff; each death
        is said once (a stand-in left dead as a zombie fooled the health checks before)."""
        def run() -> None:
            failures: dict[str, int] = {}
            while not self._stopping.wait(SUPERVISE_S):
                for index, stand_in in enumerate(self.started):
                    code = stand_in.process.poll() if stand_in.process is not None else None
                    if code is None or stand_in.restart is None:
                        continue
                    attempt = failures.get(stand_in.name, 0)
                    delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                    say(f"{LABEL[self.kind]} backend {stand_in.name!r} exited (status {code}); restarting it in {delay:g} s")
                    if self._stopping.wait(delay):
                        return
                    try:
                        self.started[index] = stand_in.restart()
                        failures[stand_in.name] = 0
                        say(f"{LABEL[self.kind]} backend {stand_in.name!r} restarted at {self.started[index].url}")
                    except Exception as exc:  # noqa: BLE001 - keep supervising the others; try again later
                        failures[stand_in.name] = attempt + 1
                        say(f"{LABEL[self.kind]} backend {stand_in.name!r} did not restart: {exc}")

        self._supervisor = threading.Thread(target=run, name="stand-in supervisor", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        stop_all(self.started)
        for stand_in in self.on_demand:
            assert stand_in.pidfile is not None
            stop_detached(stand_in.pidfile)


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def simulated_command(model: str, max_model_len: int, port: int, extra: tuple[str, ...] = DEMO_KNOBS) -> list[str]:
    return [sys.executable, "-m", "dreamseed.standins.simulated_vllm", "--host", "127.0.0.1", "--port", str(port),
            "--model", model, "--max-model-len", str(max_model_len), *extra]


def start_simulated(name: str, model: str, max_model_len: int, port: int = 0,
                    extra: tuple[str, ...] = DEMO_KNOBS) -> StandIn:
    process = subprocess.Popen(simulated_command(model, max_model_len, port, extra), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    found = _LISTENING.search(line)
    if not found:
        process.kill()
        raise RuntimeError(f"simulated backend {name} did not start (port {port} taken?): {line.strip()!r}")
    bound = int(found[1].rsplit(":", 1)[1])
    # Keep reading (and dropping) its output, so it never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return StandIn(name, found[1], process,
                   restart=lambda: start_simulated(name, model, max_model_len, bound, extra))


def _start_llama(local: LocalModel, name: str, model: str, port: int, context: int, logs: Path) -> StandIn:
    from .local_model import LlamaServer

    server = LlamaServer.start(local, model, port=port, context=context, log_path=logs / f"{name}.log")
    return StandIn(name, server.url, server.process, restart=lambda: _start_llama(local, name, model, port, context, logs))


def _local_port(url: str | None) -> int:
    parts = urlsplit(url) if url else None
    return parts.port if parts is not None and parts.hostname in LOOPBACK and parts.port else 0


def stand_in_for_missing(policies: Policies, environ: Mapping[str, str], kind: Kind,
                         state: Path) -> tuple[Policies, StandIns]:
    """Start a stand-in for every always-on backend that cannot be reached now; give every
    unreachable on-demand backend a command actuator that starts one. Returns the policies to
    serve (with those actuators) and what to stop at the end."""
    stand_ins = StandIns(kind)
    scale = dict(policies.scale.backends)
    local = None
    if kind == "llama":
        from .local_model import setup

        local = setup(state)
    try:
        for name, backend in policies.catalog.backends.items():
            url = backend.resolve_url(environ)
            if url is not None and is_reachable(url):
                continue
            port = _local_port(url)
            if name in scale:
                port = port or free_port()
                pidfile = state / "stand-ins" / f"{name}.pid"
                control = [sys.executable, "-m", "dreamseed.cli", "stand-in"]
                where = ["--pidfile", str(pidfile)]
                what = ["--kind", kind, "--port", str(port), "--model", backend.model,
                        "--context", str(backend.context_length), "--state", str(state)]
                actuator = CommandActuator(start=[*control, "start", *where, *what], stop=[*control, "stop", *where],
                                           status=[*control, "status", *where], timeout=120.0)
                scale[name] = msgspec.structs.replace(scale[name], actuator=actuator)
                stand_ins.on_demand.append(StandIn(name, f"http://127.0.0.1:{port}", None, pidfile))
            elif local is not None:
                logs = state / "stand-ins"
                logs.mkdir(parents=True, exist_ok=True)
                stand_ins.started.append(_start_llama(local, name, backend.model, port or free_port(),
                                                      min(backend.context_length, MAX_LOCAL_CONTEXT), logs))
            else:
                stand_ins.started.append(start_simulated(name, backend.model, backend.context_length, port))
    except BaseException:
        stand_ins.stop()
        raise
    return replace(policies, scale=Scale(backends=scale)), stand_ins


def stop_all(backends: list[StandIn]) -> None:
    running = [b.process for b in backends if b.process is not None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


# --- detached stand-ins: the on-demand command actuator's target -------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def start_detached(pidfile: Path, command: list[str]) -> int:
    """Start the command in its own session and return at once (the scaler polls /health
    itself). Already running: nothing to do."""
    pid = _read_pid(pidfile)
    if pid is not None and _alive(pid):
        return pid
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with pidfile.with_suffix(".log").open("ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    pidfile.write_text(str(process.pid))
    return process.pid


def stop_detached(pidfile: Path, grace: float = 10.0) -> None:
    pid = _read_pid(pidfile)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def detached_running(pidfile: Path) -> bool:
    pid = _read_pid(pidfile)
    return pid is not None and _alive(pid)


def cmd_stand_in(args: argparse.Namespace) -> int:
    """``dreamseed stand-in start|stop|status``: what the on-demand command actuator runs."""
    pidfile = Path(args.pidfile)
    if args.action == "status":
        return 0 if detached_running(pidfile) else 3
    if args.action == "stop":
        stop_detached(pidfile)
        return 0
    if args.kind == "llama":
        from .local_model import server_command, setup

        command = server_command(setup(Path(args.state)), args.port, args.model, context=min(args.context, MAX_LOCAL_CONTEXT))
    else:
        command = simulated_command(args.model, args.context, args.port)
    start_detached(pidfile, command)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    stand_in = commands.add_parser(
        "stand-in", help="start/stop/status of a local stand-in backend (the on-demand actuator of serve's "
                         "--simulate-missing and --local-model)")
    stand_in.add_argument("action", choices=["start", "stop", "status"])
    stand_in.add_argument("--pidfile", required=True)
    stand_in.add_argument("--kind", choices=["simulated", "llama"], default="simulated")
    stand_in.add_argument("--port", type=int, default=0)
    stand_in.add_argument("--model", default="stand-in")
    stand_in.add_argument("--context", type=int, default=4096)
    stand_in.add_argument("--state", default=".dreamseed")
    stand_in.set_defaults(func=cmd_stand_in)

