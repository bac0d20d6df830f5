"""A hung backend (its process stopped with SIGSTOP: connections are accepted by the kernel, nothing
answers). With `timeouts.first_byte` a request moves along the fallback chain after that many
seconds instead of waiting the read timeout, and the health verdict follows the circuit: a backend
is reported `down` exactly when routing skips it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import Process, Sim, start_proxy, start_sim, write_policies

ADMIN = {"authorization": "Bearer hung-admin"}


@pytest.fixture
def hung(tmp_path: Path) -> Iterator[tuple[Process, Sim, Sim]]:
    primary, secondary = start_sim("m-primary"), start_sim("m-secondary")
    health = {"interval": 0.5, "timeout": 0.5, "unhealthy_threshold": 3, "cooldown": 30}
    backends = {
        "primary": {"url": primary.url, "model": "m-primary", "context_length": 4096, "health": health,
                    "timeouts": {"connect": 1, "read": 30, "write": 5, "pool": 5, "first_byte": 1}},
        "secondary": {"url": secondary.url, "model": "m-secondary", "context_length": 4096, "health": health},
    }
    proxy = start_proxy(write_policies(tmp_path, backends,
                                       {"rules": [{"name": "default", "target": "primary", "fallback": ["secondary"]}]}),
                        env={"DREAMSEED_ADMIN_KEY": "hung-admin"})
    yield proxy, primary, secondary
    os.kill(primary.popen.pid, signal.SIGCONT)
    proxy.stop()
    primary.stop()
    secondary.stop()


def test_a_hung_backend_is_skipped_after_first_byte_and_reported_as_the_circuit_says(
        hung: tuple[Process, Sim, Sim]) -> None:
    proxy, primary, _ = hung
    ask = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{proxy.url}/v1/chat/completions", json=ask, timeout=30).headers["x-dreamseed-backend"] == "primary"
    os.kill(primary.popen.pid, signal.SIGSTOP)
    started = time.monotonic()
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=ask, timeout=30)
    took = time.monotonic() - started
    assert response.status_code == 200 and response.headers["x-dreamseed-backend"] == "secondary"
    assert response.headers["x-dreamseed-fallback"] == "primary:first_byte_timeout"
    assert took < 5  # the 1 s first_byte limit, not the 30 s read timeout
    # Until the circuit opens the verdict is `failing`, never `down` with a closed circuit; then both say so.
    deadline = time.monotonic() + 15
    seen: set[str] = set()
    while True:
        view = httpx.get(f"{proxy.url}/admin/backends", headers=ADMIN).json()["backends"]["primary"]
        assert (view["state"] == "down") == (view["circuit"] != "closed"), view
        seen.add(view["state"])
        if view["state"] == "down":
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    skipped = httpx.post(f"{proxy.url}/v1/chat/completions", json=ask, timeout=30)
    assert skipped.headers["x-dreamseed-fallback"] == "primary:circuit_open"
