"""Policy hot reload: validate, then swap; invalid edits keep the running policy."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import Process, Sim, start_proxy, start_sim, write_policies

ADMIN = {"authorization": "Bearer reload-admin"}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, Sim]]:
    started = {"general": start_sim("m-general"), "fast": start_sim("m-fast")}
    yield started
    for sim in started.values():
        sim.stop()


def catalog(sims: dict[str, Sim], names: tuple[str, ...] = ("general", "fast")) -> dict[str, Any]:
    return {name: {"url": sims[name].url, "model": f"m-{name}", "context_length": 1024} for name in names}


ALL_GENERAL = {"rules": [{"name": "default", "target": "general"}]}
FAST_RULE = {"rules": [{"name": "fast", "match": {"keywords": ["빠른"]}, "target": "fast"},
                       {"name": "default", "target": "general"}]}


def ask(proxy: Process, text: str = "빠른 답변") -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                      json={"model": "auto", "messages": [{"role": "user", "content": text}]})


def eventually(check: Any, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def policies_state(proxy: Process) -> dict[str, Any]:
    return httpx.get(f"{proxy.url}/admin/policies", headers=ADMIN).json()


@pytest.fixture
def proxy_on(tmp_path: Path, sims: dict[str, Sim]) -> Iterator[Any]:
    started: list[Process] = []

    def start(extra: list[str] | None = None) -> tuple[Process, Path]:
        directory = write_policies(tmp_path / "policies", catalog(sims), ALL_GENERAL)
        proxy = start_proxy(directory, env={"DREAMSEED_ADMIN_KEY": "reload-admin"}, extra=extra)
        started.append(proxy)
        return proxy, directory

    yield start
    for proxy in started:
        proxy.stop()


def test_a_file_change_is_validated_and_swapped_in(proxy_on: Any, sims: dict[str, Sim]) -> None:
    proxy, directory = proxy_on()
    assert ask(proxy).headers["x-dreamseed-backend"] == "general"
    before = policies_state(proxy)
    (directory / "routing.yaml").write_text(yaml.safe_dump(FAST_RULE, allow_unicode=True), encoding="utf-8")
    assert eventually(lambda: ask(proxy).headers["x-dreamseed-backend"] == "fast")
    after = policies_state(proxy)
    assert after["policy_hash"] != before["policy_hash"] and after["reloads"]["success"] == 1
    assert ask(proxy, "hello").headers["x-dreamseed-backend"] == "general"


def test_an_invalid_edit_keeps_the_running_policy_and_is_reported(proxy_on: Any) -> None:
    proxy, directory = proxy_on()
    running = policies_state(proxy)["policy_hash"]
    (directory / "routing.yaml").write_text("rules:\n  - name: default\n    target: nowhere\n", encoding="utf-8")
    state = eventually(lambda: (s := policies_state(proxy))["reloads"]["failure"] >= 1 and s)
    assert state["policy_hash"] == running
    assert "routing.yaml:3: rules[0].target: unknown backend 'nowhere'" in state["last_error"]
    assert ask(proxy).status_code == 200 and ask(proxy).headers["x-dreamseed-backend"] == "general"
    assert "policy reload (file change) refused" in proxy.log()

    refused = httpx.post(f"{proxy.url}/admin/policies/reload", headers=ADMIN)
    assert refused.status_code == 422 and "unknown backend 'nowhere'" in refused.json()["error"]
    (directory / "routing.yaml").write_text(yaml.safe_dump(FAST_RULE, allow_unicode=True), encoding="utf-8")
    accepted = httpx.post(f"{proxy.url}/admin/policies/reload", headers=ADMIN)
    assert accepted.status_code == 200 and accepted.json()["ok"] is True
    assert ask(proxy).headers["x-dreamseed-backend"] == "fast"
    assert policies_state(proxy)["last_error"] is None


def test_sighup_reloads(proxy_on: Any) -> None:
    proxy, directory = proxy_on(["--no-watch-policies"])
    (directory / "routing.yaml").write_text(yaml.safe_dump(FAST_RULE, allow_unicode=True), encoding="utf-8")
    time.sleep(1.5)
    assert ask(proxy).headers["x-dreamseed-backend"] == "general"  # not watching: nothing changed yet
    proxy.popen.send_signal(signal.SIGHUP)
    assert eventually(lambda: ask(proxy).headers["x-dreamseed-backend"] == "fast")


def test_in_flight_requests_finish_on_the_policy_they_started_with(proxy_on: Any, sims: dict[str, Sim]) -> None:
    proxy, directory = proxy_on(["--no-watch-policies"])
    (directory / "routing.yaml").write_text(yaml.safe_dump(FAST_RULE, allow_unicode=True), encoding="utf-8")
    httpx.post(f"{proxy.url}/admin/policies/reload", headers=ADMIN).raise_for_status()
    sims["fast"].configure(tokens=8, token_delay=0.15)
    try:
        body = {"model": "auto", "messages": [{"role": "user", "content": "빠른 답변"}], "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            # Mid-stream, a new policy removes the backend this stream is on.
            write_policies(directory, catalog(sims, ("general",)), ALL_GENERAL)
            swapped = httpx.post(f"{proxy.url}/admin/policies/reload", headers=ADMIN).json()
            assert swapped["changed"] is True
            rest = [line for line in lines if line.startswith("data: ")]
        assert response.headers["x-dreamseed-backend"] == "fast"
        assert rest[-1] == "data: [DONE]" and len(rest) == 8 + 1 + 1  # all tokens after the role chunk
        assert not any('"error"' in line for line in rest)
        assert ask(proxy).headers["x-dreamseed-backend"] == "general"  # new requests: the new policy
    finally:
        sims["fast"].reset()
