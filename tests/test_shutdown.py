"""Graceful shutdown: stop accepting, let streams in flight finish, then exit."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from support import start_proxy, start_sim, write_policies


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_connections(tmp_path: Path) -> None:
    sim = start_sim("m", tokens=10, token_delay=0.1)
    try:
        policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 1024}},
                                  {"rules": [{"name": "default", "target": "general"}]})
        proxy = start_proxy(policies)  # --shutdown-grace 2: plenty for a 1 s stream
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proxy.popen.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert first and rest[-1] == "data: [DONE]" and len(rest) == 10 + 1 + 1  # every token after the role chunk
        assert proxy.popen.wait(timeout=10) is not None
        parts = urlsplit(proxy.url)
        with socket.socket() as s:
            assert s.connect_ex((parts.hostname, parts.port)) != 0  # nothing listens any more
        assert sim.stats()["finished"] == 1 and sim.stats()["cancelled"] == 0
    finally:
        sim.stop()


def test_a_stream_longer_than_the_grace_period_is_cut_with_a_clean_end(tmp_path: Path) -> None:
    sim = start_sim("m", tokens=200, token_delay=0.05)
    try:
        policies = write_policies(tmp_path / "p", {"general": {"url": sim.url, "model": "m", "context_length": 1024}},
                                  {"rules": [{"name": "default", "target": "general"}]})
        proxy = start_proxy(policies)  # grace 2 s, the stream needs 10 s
        body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        received = []
        try:
            with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.append(line)
                        if len(received) == 1:
                            proxy.popen.send_signal(signal.SIGTERM)
        except httpx.HTTPError:
            pass  # the connection may be closed under us: what matters is that it does not hang
        assert proxy.popen.wait(timeout=10) is not None
        assert 1 <= len(received) < 200
        stats = sim.wait_for(lambda s: s["active"] == 0)
        assert stats["active"] == 0 and stats["cancelled"] == 1  # the backend was told to stop
    finally:
        sim.stop()
