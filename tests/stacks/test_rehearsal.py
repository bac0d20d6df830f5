"""The remote70b stack deployed, auto-stopped, relaunched and destroyed as Pulumi really runs it
(rehearsal.py: its commands run from the `main` folder, over the provider's SSH rules, against the
fake Lambda API and fake hosts that behave like Lambda's image)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.components.remote_gpu import SERVER_LABEL
from infra.program import load_script

from .conftest import SECRETS
from .fakes import FakeCloud, FakeHost
from .rehearsal import Rehearsal, rehearsal

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["gpu-host-instance", "gpu-host-host-key", "gpu-host-vllm", "gpu-host-tunnel-access"]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[FakeCloud]:
    found = FakeCloud(tmp_path / "hosts", key=SECRETS["lambdaApiKey"])
    yield found
    found.stop()


def host_of(stage: Rehearsal) -> FakeHost:
    return stage.remote.cloud.hosts[stage.remote.outputs["publicIp"]]


def auto_stop(host: FakeHost, cloud: FakeCloud) -> str:
    """The watchdog the bootstrap installed on the host, run as systemd would with its installed settings,
    on a fake clock: vLLM never answers here, so the instance is idle from the watchdog's start."""
    installed = load_script(host.path("/opt/dreamseed/idle_watchdog.py"), f"watchdog_{host.ip.replace('.', '_')}")
    settings = dict(line.split("=", 1) for line in host.path("/etc/dreamseed/watchdog.env").read_text().splitlines())
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    reason: str = installed.run({**settings, "DREAMSEED_METRICS_URL": f"http://{host.ip}:9/metrics"},
                                clock=lambda: now[0], sleep=sleep, polls=200)
    assert not host.alive and settings["LAMBDA_INSTANCE_ID"] not in cloud.state["instances"]
    return reason


def relaunch_section() -> list[str]:
    """The commands docs/infrastructure.md gives for bringing the instance back after an auto-stop."""
    text = (ROOT / "docs" / "infrastructure.md").read_text(encoding="utf-8")
    section = text[text.index("### Relaunch after an auto-stop"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_up_auto_stop_relaunch_and_destroy_as_pulumi_runs_them(cloud: FakeCloud) -> None:
    stage = rehearsal(cloud)
    stage.pulumi("pulumi up --stack remote70b")
    # The instance, then the first contact, then (in either order) the two commands pinned to its key.
    assert stage.remote.steps[:2] == [("create", name) for name in COMMANDS[:2]]
    assert sorted(stage.remote.steps) == sorted(("create", name) for name in COMMANDS)
    first = host_of(stage)
    # The bootstrap ran as `ubuntu`, outside the docker group: every docker call went through sudo.
    assert first.docker_calls() and all(call["as_root"] for call in first.docker_calls() if call["args"][0] != "info")
    (server,) = first.containers().values()
    assert server["name"] == "dreamseed-general70" and SERVER_LABEL in server["labels"]
    assert server["env"] == {"HF_TOKEN": SECRETS["hfToken"], "VLLM_API_KEY": SECRETS["vllmApiKey"]}
    assert stage.remote.outputs["sshHostKey"] == first.host_key
    stage.pulumi("pulumi up --stack local")
    assert tunnel_env(stage)["SSH_HOST"] == first.ip and tunnel_env(stage)["SSH_HOST_KEY"] == first.host_key

    # An hour without requests: the watchdog terminates the instance through Lambda's API.
    assert auto_stop(first, cloud) == "no requests for 60 min (limit 60 min)"
    # A plain `pulumi up` cannot see it: pulumi-command has no Read, so nothing is re-run.
    stage.remote.steps.clear()
    stage.pulumi("pulumi up --stack remote70b")
    assert {operation for operation, _ in stage.remote.steps} == {"same"}

    # What the docs say to run brings a new instance with its vLLM, tunnel key and host key, and the
    # local stack's tunnel follows, without a single dial to the dead host.
    stage.remote.steps.clear()
    for line in relaunch_section():
        stage.pulumi(line)
    assert ("replace", "gpu-host-instance") in stage.remote.steps
    assert stage.remote.clock == 0
    second = host_of(stage)
    assert second.ip != first.ip and second.alive and second.host_key != first.host_key
    assert [c["name"] for c in second.containers().values()] == ["dreamseed-general70"]
    assert tunnel_env(stage)["SSH_HOST"] == second.ip and tunnel_env(stage)["SSH_HOST_KEY"] == second.host_key
    assert public_half(tunnel_key(stage)) in (second.home / ".ssh" / "authorized_keys").read_text()
    assert list(cloud.state["instances"]) == ["inst2"]

    # Auto-stopped again, then destroyed: done at once, nothing billed, nothing left in the state.
    auto_stop(second, cloud)
    stage.pulumi("pulumi destroy --stack remote70b")
    assert stage.remote.clock == 0 and stage.remote.state == {} and cloud.state["instances"] == {}


@pytest.mark.parametrize("in_docker_group", [False, True])
def test_the_bootstrap_reaches_docker_whether_or_not_the_login_user_is_in_the_docker_group(
        cloud: FakeCloud, in_docker_group: bool) -> None:
    cloud.docker_group = in_docker_group
    stage = rehearsal(cloud)
    stage.pulumi("pulumi up --stack remote70b")
    host = host_of(stage)
    calls = [call for call in host.docker_calls() if call["args"][0] != "info"]
    assert {call["as_root"] for call in calls} == {not in_docker_group}  # sudo only where it is needed
    (server,) = host.containers().values()
    assert server["name"] == "dreamseed-general70" and set(server["env"]) == {"HF_TOKEN", "VLLM_API_KEY"}


def test_no_secret_is_shown_while_the_commands_run(cloud: FakeCloud) -> None:
    stage = rehearsal(cloud)
    stage.pulumi("pulumi up --stack remote70b")
    shown = "\n".join(stage.remote.streamed)
    assert "is healthy on 127.0.0.1:8000" in shown  # the bootstrap's progress is shown
    secrets = [*SECRETS.values(), tunnel_key(stage)]
    for secret in secrets:
        for line in secret.splitlines():
            assert line not in shown
    assert stage.remote.entry("gpu-host-tunnel-access").inputs["logging"] == "none"


def test_a_reused_address_gets_no_secret_the_connection_is_pinned_to_the_first_contacts_host_key(
        cloud: FakeCloud) -> None:
    stage = rehearsal(cloud)
    stage.pulumi("pulumi up --stack remote70b")
    first = host_of(stage)
    for name in ("gpu-host-vllm", "gpu-host-tunnel-access"):
        assert stage.remote.entry(name).inputs["connection"]["hostKey"] == first.host_key
    # The instance ends (the watchdog), and Lambda gives its address to someone else's instance.
    auto_stop(first, cloud)
    stranger = cloud.reuse_address(first.ip)
    # A change that re-runs the bootstrap, applied without the relaunch: it must not reach the stranger.
    stage.remote.config["dreamseed:idleMinutes"] = "30"
    with pytest.raises(Exception, match="host key mismatch"):
        stage.pulumi("pulumi up --stack remote70b")
    assert stranger.commands == [] and stranger.stdin_seen == []


def test_an_instance_whose_ssh_never_answers_is_terminated_not_left_without_its_watchdog(cloud: FakeCloud) -> None:
    cloud.state["silent_ssh"] = True
    stage = rehearsal(cloud)
    with pytest.raises(Exception, match="its SSH server .* did not answer; terminated it, so it is not billed"):
        stage.pulumi("pulumi up --stack remote70b")
    assert cloud.state["instances"] == {} and stage.remote.state == {}


def tunnel_env(stage: Rehearsal) -> dict[str, str]:
    """The local stack's tunnel container's environment, as its last `up` declared it."""
    envs = stage.local.declared["tunnel-general70"]["envs"]
    return dict(str(line).split("=", 1) for line in envs)


def tunnel_key(stage: Rehearsal) -> str:
    return str(json.loads(stage.remote.entry("gpu-host-tunnel-access").outputs["stdout"])["tunnel_key"])


def public_half(private_key: str) -> str:
    import subprocess

    done = subprocess.run(["ssh-keygen", "-y", "-f", "/dev/stdin"], input=private_key, capture_output=True, text=True,
                          check=True)
    return done.stdout.split()[1]
