"""The 70B host's cost guard: infra/scripts/idle_watchdog.py terminates the instance when vLLM has
served nothing for the idle limit, or when the instance reaches its maximum lifetime. The decision
runs on a fake clock; the installed copy runs against a fake vLLM /metrics page and the fake
Lambda API on real sockets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dreamseed.policy import load_policies
from infra.components.remote_gpu import AutoStop, bootstrap_script, watchdog_install
from infra.program import load_script
from support import reply

from .conftest import SECRETS, Runner, remote_command, secret_occurrences
from .fakes import FakeCloud
from .test_remote_stack import fake_lambda  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "scripts" / "idle_watchdog.py"


watchdog_module = load_script(SCRIPT, "idle_watchdog")
Watchdog = watchdog_module.Watchdog
read_activity = watchdog_module.read_activity

HOUR = 3600.0


def vllm_metrics(finished: float, running: float = 0, waiting: float = 0) -> str:
    """What vLLM's /metrics says about requests (V1 engine names and labels), among other series."""
    return f"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="meta-llama/Llama-3.1-70B-Instruct"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="meta-llama/Llama-3.1-70B-Instruct"}} {waiting}
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="meta-llama/Llama-3.1-70B-Instruct"}} {finished}
vllm:request_success_total{{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-70B-Instruct"}} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="meta-llama/Llama-3.1-70B-Instruct"}} 0.0
# TYPE http_requests_total counter
http_requests_total{{handler="/health",method="GET",status="2xx"}} 523.0
"""


def test_activity_is_read_from_vllms_request_metrics_only() -> None:
    assert read_activity(vllm_metrics(finished=4, running=2, waiting=1)) == (5.0, 3.0)
    # Health probes and scrapes show up elsewhere (http_requests_total): they are not use.
    assert read_activity("# nothing\nhttp_requests_total 99\n") is None
    assert read_activity("") is None


def test_idle_for_the_limit_terminates_and_any_request_resets_it() -> None:
    dog = Watchdog(idle_seconds=HOUR, max_lifetime_seconds=24 * HOUR, booted=0.0, last_activity=0.0)
    assert dog.observe(0.0, None) is None  # vLLM still loading its weights
    assert dog.observe(600.0, read_activity(vllm_metrics(finished=0))) is None
    assert dog.observe(1800.0, read_activity(vllm_metrics(finished=1))) is None  # a request finished: active at 30 min
    assert dog.observe(1800.0 + HOUR - 1, read_activity(vllm_metrics(finished=1))) is None
    assert dog.observe(1800.0 + HOUR, read_activity(vllm_metrics(finished=1))) == "no requests for 60 min (limit 60 min)"


def test_a_long_running_request_is_use_even_before_it_finishes() -> None:
    dog = Watchdog(idle_seconds=HOUR, max_lifetime_seconds=0, booted=0.0, last_activity=0.0)
    for minute in range(0, 180, 10):  # one request generating for three hours: counters never move
        assert dog.observe(minute * 60.0, read_activity(vllm_metrics(finished=0, running=1))) is None
    assert dog.observe(180 * 60.0 + HOUR, read_activity(vllm_metrics(finished=0))) is not None


def test_a_server_that_never_answers_is_idle_from_the_watchdogs_start() -> None:
    dog = Watchdog(idle_seconds=HOUR, max_lifetime_seconds=0, booted=0.0, last_activity=5 * HOUR)
    assert dog.observe(5 * HOUR + HOUR - 1, None) is None  # a restarted watchdog does not count the hours before it
    assert dog.observe(6 * HOUR, None) == "no requests for 60 min (limit 60 min)"


def test_the_maximum_lifetime_ends_even_a_busy_instance_and_zero_turns_limits_off() -> None:
    dog = Watchdog(idle_seconds=HOUR, max_lifetime_seconds=24 * HOUR, booted=0.0, last_activity=600.0)
    for hour in range(1, 24):
        assert dog.observe(hour * HOUR, read_activity(vllm_metrics(finished=hour))) is None
    assert dog.observe(24 * HOUR, read_activity(vllm_metrics(finished=25))) == \
        "the instance reached its maximum lifetime of 24 h"
    never = Watchdog(idle_seconds=0, max_lifetime_seconds=0, booted=0.0, last_activity=0.0)
    assert never.observe(1000 * HOUR, None) is None


class FakeVllm(BaseHTTPRequestHandler):
    page: dict[str, str]

    def do_GET(self) -> None:
        reply(self, 200 if self.path == "/metrics" else 404, self.page["text"].encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_vllm() -> Iterator[tuple[str, dict[str, str]]]:
    page = {"text": vllm_metrics(finished=0)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (FakeVllm,), {"page": page}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics", page
    server.shutdown()


def install_on_fake_host(tmp_path: Path, lambda_url: str, auto_stop: AutoStop) -> Path:
    """Run the bootstrap's watchdog part as the instance would, with sudo, systemctl, docker and
    friends replaced by stubs, and the root filesystem's /opt and /etc under tmp_path."""
    root, bin_dir = tmp_path / "root", tmp_path / "bin"
    bin_dir.mkdir()
    (root / "etc" / "systemd" / "system").mkdir(parents=True)  # there on any systemd host
    stubs = {
        # sudo runs the command with /opt/... and /etc/... moved under the fake root.
        "sudo": f'#!/bin/bash\nargs=("${{@//\\/opt\\//{root}/opt/}}")\nargs=("${{args[@]//\\/etc\\//{root}/etc/}}")\n'
                'exec "${args[@]}"\n',
        "systemctl": f'#!/bin/sh\necho "$@" >> {tmp_path}/systemctl.log\n',
        "docker": f'#!/bin/sh\necho "$@" >> {tmp_path}/docker.log\n',
        "curl": "#!/bin/sh\nexit 0\n",
        "mountpoint": "#!/bin/sh\nexit 0\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    backend = load_policies(ROOT / "policies").catalog.backends["general70"]
    script = bootstrap_script("general70", backend, watchdog=watchdog_install("inst1", lambda_url, auto_stop))
    done = subprocess.run(["bash", "-c", script], input=f"{SECRETS['hfToken']}\nvllm-key\ntest-key\n", text=True,
                          capture_output=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    return root


def test_the_installed_watchdog_terminates_the_idle_instance_through_lambdas_api(
        tmp_path: Path, fake_vllm, fake_lambda) -> None:  # noqa: F811
    metrics_url, page = fake_vllm
    lambda_url, state = fake_lambda
    state["instances"]["inst1"] = {"id": "inst1", "name": "dreamseed-70b", "status": "active", "ip": "203.0.113.50",
                                   "region": {"name": "us-west-2"}, "instance_type": {"name": "gpu_2x_a100"}}
    root = install_on_fake_host(tmp_path, lambda_url, AutoStop(idle_minutes=60, max_lifetime_hours=24))

    installed = root / "opt" / "dreamseed" / "idle_watchdog.py"
    assert installed.read_text(encoding="utf-8") == SCRIPT.read_text(encoding="utf-8")  # verbatim through the heredoc
    env_file = root / "etc" / "dreamseed" / "watchdog.env"
    assert env_file.stat().st_mode & 0o777 == 0o600  # holds the Lambda API key: root only
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert settings == {"LAMBDA_API_URL": lambda_url, "LAMBDA_INSTANCE_ID": "inst1", "DREAMSEED_IDLE_SECONDS": "3600",
                        "DREAMSEED_MAX_LIFETIME_SECONDS": "86400",
                        "DREAMSEED_METRICS_URL": "http://127.0.0.1:8000/metrics", "LAMBDA_API_KEY": "test-key"}
    unit = (root / "etc" / "systemd" / "system" / "dreamseed-idle-watchdog.service").read_text()
    assert "EnvironmentFile=/etc/dreamseed/watchdog.env" in unit and "ExecStart=/usr/bin/python3 /opt/dreamseed/" in unit
    assert "Restart=always" in unit
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload", "enable dreamseed-idle-watchdog", "restart dreamseed-idle-watchdog"]

    # The installed copy, run with the installed settings against the fake vLLM, on a fake clock.
    installed_module = load_script(installed, "installed_watchdog")
    now = [7200.0]  # booted two hours ago

    def sleep(seconds: float) -> None:
        now[0] += 600  # each poll is ten minutes later
        if now[0] == 7200.0 + 1800:
            page["text"] = vllm_metrics(finished=3)  # someone used it at 2:30

    environ = {**settings, "DREAMSEED_METRICS_URL": metrics_url}
    reason = installed_module.run(environ, clock=lambda: now[0], sleep=sleep, polls=20)
    assert reason == "no requests for 60 min (limit 60 min)"
    assert now[0] == 7200.0 + 1800 + HOUR  # idle counted from the last use, not from boot
    assert state["calls"] == [("/api/v1/instance-operations/terminate", {"instance_ids": ["inst1"]})]
    assert state["instances"] == {}


def test_the_bootstrap_keeps_the_weights_on_the_persistent_filesystem() -> None:
    backend = load_policies(ROOT / "policies").catalog.backends["general70"]
    script = bootstrap_script("general70", backend, file_system_name="dreamseed-models")
    assert "CACHE=/lambda/nfs/dreamseed-models/huggingface" in script
    assert "mountpoint -q /lambda/nfs/dreamseed-models" in script
    assert '-v "$CACHE:/root/.cache/huggingface"' in script
    without = bootstrap_script("general70", backend)
    assert 'CACHE="$HOME/.cache/huggingface"' in without and "/lambda/nfs" not in without


def test_the_stack_installs_the_watchdog_with_its_limits_and_the_key_only_on_stdin(run_stack: Runner) -> None:
    mocks, outputs = run_stack("remote70b", {"dreamseed:idleMinutes": "30", "dreamseed:maxLifetimeHours": "8"})
    server = remote_command(mocks, "gpu-host-vllm")
    script = server.inputs["create"]
    assert "DREAMSEED_IDLE_SECONDS=1800" in script and "DREAMSEED_MAX_LIFETIME_SECONDS=28800" in script
    assert re.search(r"LAMBDA_INSTANCE_ID=0920582c7ff041399e34823a0be62549\b", script)
    assert SECRETS["lambdaApiKey"] not in script  # on stdin, as a secret, never in the script or its triggers
    assert secret_occurrences(server.inputs["stdin"], SECRETS["lambdaApiKey"]) == 1
    assert "1800" not in str(server.inputs.get("triggers", [])) and "30" in server.inputs["triggers"]
    (instance,) = mocks.of_type("command:local:Command")
    env = instance.inputs["environment"]
    env = env["value"] if "value" in env else env  # the secret key makes the whole map secret
    assert env["LAMBDA_FILE_SYSTEM"] == "dreamseed-models"
    assert "dreamseed-models" in instance.inputs["triggers"]  # another filesystem means another instance
    assert outputs["autoStop"] == ({"idleMinutes": 30.0, "maxLifetimeHours": 8.0}, False)
    relaunch, _ = outputs["relaunch"]
    assert re.fullmatch(r"pulumi up --stack remote70b --replace 'urn:pulumi:[^']+::gpu-host-instance' "
                        r"&& pulumi up --stack local", relaunch)


def test_auto_stop_settings_must_not_be_negative(run_stack: Runner) -> None:
    with pytest.raises(Exception, match=r"dreamseed:idleMinutes must be 0 \(off\) or more, not -5"):
        run_stack("remote70b", {"dreamseed:idleMinutes": "-5"})


def test_a_missing_persistent_filesystem_fails_before_launching(fake_lambda) -> None:  # noqa: F811
    url, state = fake_lambda
    state["file_systems"] = [{"id": "fs1", "name": "dreamseed-models", "region": {"name": "us-south-1"},
                              "mount_point": "/lambda/nfs/dreamseed-models"}]
    env = {"LAMBDA_API_URL": url, "LAMBDA_API_KEY": "test-key", "LAMBDA_REGION": "us-east-1",
           "LAMBDA_INSTANCE_TYPE": "gpu_2x_h100_sxm5", "LAMBDA_INSTANCE_NAME": "dreamseed-70b",
           "LAMBDA_SSH_KEY_NAME": "dreamseed", "LAMBDA_POLL_SECONDS": "0.01", "LAMBDA_FILE_SYSTEM": "dreamseed-models",
           **FakeCloud.by_url[url].script_env()}
    lambda_script = ROOT / "infra" / "scripts" / "lambda_instance.py"
    elsewhere = subprocess.run([sys.executable, str(lambda_script), "create"], capture_output=True, text=True,
                               timeout=30, env={**os.environ, **env})
    assert elsewhere.returncode == 1
    assert ("persistent filesystem 'dreamseed-models' is not in us-east-1: it exists in us-south-1" in elsewhere.stderr)
    assert state["calls"] == []  # nothing launched
    state["file_systems"].append({**state["file_systems"][0], "id": "fs2", "region": {"name": "us-east-1"}})
    launched = subprocess.run([sys.executable, str(lambda_script), "create"], capture_output=True, text=True,
                              timeout=30, env={**os.environ, **env})
    assert launched.returncode == 0, launched.stderr
    assert state["calls"][0][1]["file_system_names"] == ["dreamseed-models"]
