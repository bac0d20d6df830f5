"""vLLM servers sharing the 5090 initialise one after another at every start, a reboot included:
each container's entrypoint waits for the servers before it to answer /health. The entrypoint is
run here with `sh`, a fake `vllm` and real HTTP servers standing in for the earlier servers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from infra.components.vllm import START_ENTRYPOINT

from .conftest import Runner


def env_of(inputs: dict[str, Any]) -> list[str]:
    envs = inputs["envs"]
    return list(envs["value"] if isinstance(envs, dict) else envs)


def test_each_server_waits_for_the_always_on_servers_before_it(run_stack: Runner) -> None:
    mocks, _ = run_stack("local")
    found = {r.inputs["name"]: r.inputs for r in mocks.of_type("docker:index/container:Container")}
    waits = {}
    for name in ("dreamseed-general", "dreamseed-fast", "dreamseed-code"):
        assert found[name]["entrypoints"] == START_ENTRYPOINT
        (after,) = [e for e in env_of(found[name]) if e.startswith("DREAMSEED_START_AFTER=")]
        waits[name] = after.split("=", 1)[1].split()
    assert waits == {
        "dreamseed-general": [],  # first on the GPU
        "dreamseed-fast": ["http://dreamseed-general:8000/health"],
        # the on-demand coder starts only on a settled GPU, whenever the scaler starts it
        "dreamseed-code": ["http://dreamseed-general:8000/health", "http://dreamseed-fast:8002/health"],
    }


class Health(BaseHTTPRequestHandler):
    ready_at: list[float]

    def do_GET(self) -> None:
        ok = time.monotonic() >= self.ready_at[0]
        self.send_response(200 if ok else 503)  # vLLM answers /health only once it can serve
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_after_a_reboot_a_server_initialises_only_once_the_one_before_it_is_healthy(tmp_path: Path) -> None:
    ready_at = [time.monotonic() + 1.5]
    earlier = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Health,), {"ready_at": ready_at}))
    threading.Thread(target=earlier.serve_forever, daemon=True).start()
    fake_vllm = tmp_path / "bin" / "vllm"
    fake_vllm.parent.mkdir()
    fake_vllm.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" > {tmp_path}/started\n')
    fake_vllm.chmod(0o755)
    began = time.monotonic()
    done = subprocess.run([*START_ENTRYPOINT, "--model", "RedHatAI/Mistral-7B-Instruct-v0.3-FP8", "--port", "8000"],
                          env={**os.environ, "PATH": f"{fake_vllm.parent}:{os.environ['PATH']}",
                               "DREAMSEED_START_AFTER": f"http://127.0.0.1:{earlier.server_address[1]}/health",
                               "DREAMSEED_START_POLL": "0.2"},
                          capture_output=True, text=True, timeout=60)
    waited = time.monotonic() - began
    earlier.shutdown()
    assert done.returncode == 0, done.stderr
    assert waited >= 1.4  # not before the earlier server answered 200
    assert "waiting for http://127.0.0.1:" in done.stderr
    # vLLM got the container's command as its arguments, through `vllm serve`.
    assert (tmp_path / "started").read_text().split(" ", 1)[1].strip() == \
        "serve --model RedHatAI/Mistral-7B-Instruct-v0.3-FP8 --port 8000"


def test_the_first_server_starts_at_once(tmp_path: Path) -> None:
    fake_vllm = tmp_path / "vllm"
    fake_vllm.write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/started\n')
    fake_vllm.chmod(0o755)
    done = subprocess.run([*START_ENTRYPOINT, "--port", "8000"], timeout=30, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DREAMSEED_START_AFTER": ""})
    assert done.returncode == 0 and (tmp_path / "started").read_text().strip() == "serve --port 8000"
