"""Limits at the HTTP layer, tried with raw sockets against a real proxy process (an HTTP client
would refuse to send most of this): oversized headers, slow headers, silent connections, a body
shorter than its Content-Length, and more connections than allowed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Process, Sim, start_proxy, start_sim, write_policies

LIMITS = ["--max-header-bytes", "8192", "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "20"]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Sim]]:
    sim = start_sim("m", max_model_len=10_000_000)
    directory: Path = tmp_path_factory.mktemp("limits")
    proxy = start_proxy(write_policies(directory, {"general": {"url": sim.url, "model": "m", "context_length": 100000}},
                                       {"rules": [{"name": "default", "target": "general"}]}), extra=LIMITS)
    yield proxy, sim
    proxy.stop()
    sim.stop()


def connect(proxy: Process) -> socket.socket:
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (or 10 s pass)."""
    out = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        out += data
    return out


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def test_a_header_flood_gets_431_and_the_connection_closes(proxy: tuple[Process, Sim]) -> None:
    with connect(proxy[0]) as sock:
        sock.sendall(HEAD + b"x-flood: " + b"a" * 100_000)  # never finished
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"request header fields too large" in answer
    assert b"Traceback" not in answer and len(answer) < 300


def test_slow_headers_get_408_within_the_header_timeout(proxy: tuple[Process, Sim]) -> None:
    with connect(proxy[0]) as sock:
        started = time.monotonic()
        sock.sendall(HEAD[:20])  # slowloris: a little, then nothing
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"headers not received in time" in answer
    assert time.monotonic() - started < 5


def test_a_silent_connection_is_closed(proxy: tuple[Process, Sim]) -> None:
    with connect(proxy[0]) as sock:
        started = time.monotonic()
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 5


def test_a_body_shorter_than_its_length_gets_408(proxy: tuple[Process, Sim]) -> None:
    with connect(proxy[0]) as sock:
        started = time.monotonic()
        sock.sendall(HEAD + b"content-length: 100\r\n\r\n" + b'{"model": ')
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body not received in time" in answer
    assert time.monotonic() - started < 5


def test_connections_beyond_the_cap_get_503(proxy: tuple[Process, Sim]) -> None:
    held = [connect(proxy[0]) for _ in range(20)]
    try:
        time.sleep(0.2)
        with connect(proxy[0]) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
    finally:
        for sock in held:
            sock.close()


def complete_request(sock: socket.socket, content: str = "hi") -> None:
    """One whole request and its 200 answer, leaving the connection kept alive."""
    body = json.dumps({"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}).encode()
    sock.sendall(HEAD + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 "), head[:200]
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    rest = head.split(b"\r\n\r\n", 1)[1]
    while len(rest) < length:
        rest += sock.recv(65536)


def test_large_bodies_and_kept_alive_connections_still_work(proxy: tuple[Process, Sim]) -> None:
    """The head limit counts the head only: a 1 MB body in the same packets is fine, and so is a
    second request on the same connection after a pause shorter than the timeouts."""
    with connect(proxy[0]) as sock:
        for _ in range(2):
            complete_request(sock, "a" * 1_000_000)
            time.sleep(0.5)


@pytest.mark.parametrize("second", ["slow head", "short body", "header flood"])
def test_the_limits_hold_for_the_next_request_on_a_kept_alive_connection(proxy: tuple[Process, Sim],
                                                                          second: str) -> None:
    """The timers start with a request's first bytes, not only with the connection: a client that
    sent one good request cannot then hold the connection with a slow or endless second one."""
    with connect(proxy[0]) as sock:
        complete_request(sock)
        started = time.monotonic()
        if second == "slow head":
            sock.sendall(HEAD[:20])
        elif second == "short body":
            sock.sendall(HEAD + b"content-length: 100\r\n\r\n" + b'{"model": ')
        else:
            sock.sendall(HEAD + b"x-flood: " + b"a" * 100_000)
        answer = read_all(sock)
    expected = {"slow head": b"HTTP/1.1 408 ", "short body": b"HTTP/1.1 408 ", "header flood": b"HTTP/1.1 431 "}[second]
    assert answer.startswith(expected), answer[:200]
    assert time.monotonic() - started < 5
