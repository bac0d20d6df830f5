"""Stand in for backends that are not there: start a simulated vLLM for each one.

Used by ``dreamseed serve --simulate-missing`` so the proxy runs end to end on a machine
without GPUs. A backend that answers on its URL is left alone; for the others a
simulated server starts on the same local port (or a free one, for remote URLs) and the
proxy is pointed at it. Everything simulated is announced as such.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .policy import Catalog

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_LISTENING = re.compile(r"listening on (http://\S+)")

# Timings that feel like a small model on a good GPU, so the demo streams visibly.
DEMO_KNOBS = ("--ttft", "0.05", "--token-delay", "0.02", "--tokens", "24")


@dataclass
class SimulatedBackend:
    name: str
    url: str
    process: subprocess.Popen[str]


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def start_simulated(name: str, model: str, max_model_len: int, port: int = 0,
                    extra: tuple[str, ...] = DEMO_KNOBS) -> SimulatedBackend:
    process = subprocess.Popen(
        [sys.executable, "-m", "dreamseed.simulated_vllm", "--host", "127.0.0.1", "--port", str(port),
         "--model", model, "--max-model-len", str(max_model_len), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    found = _LISTENING.search(line)
    if not found:
        process.kill()
        raise RuntimeError(f"simulated backend {name} did not start (port {port} taken?): {line.strip()!r}")
    return SimulatedBackend(name, found[1], process)


def simulate_missing(catalog: Catalog, environ: Mapping[str, str]) -> list[SimulatedBackend]:
    """Start a simulated server for every backend that cannot be reached now."""
    started: list[SimulatedBackend] = []
    try:
        for name, backend in catalog.backends.items():
            url = backend.resolve_url(environ)
            if url is not None and is_reachable(url):
                continue
            parts = urlsplit(url) if url else None
            local_port = parts.port if parts is not None and parts.hostname in LOOPBACK and parts.port else 0
            started.append(start_simulated(name, backend.model, backend.context_length, local_port))
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(backends: list[SimulatedBackend]) -> None:
    for backend in backends:
        backend.process.terminate()
    for backend in backends:
        try:
            backend.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            backend.process.kill()
