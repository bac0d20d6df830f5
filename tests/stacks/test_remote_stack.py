"""The `remote70b` stack (Lambda Cloud 2xA100) under Pulumi mocks, and its instance script
against a fake Lambda Cloud API on a real socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra import images

from .conftest import HOST_KEY, INSTANCE, SECRETS, TUNNEL_KEY, Runner, plain_occurrences, remote_command, secret_occurrences
from .fakes import CATALOG, FakeCloud
from .rehearsal import main_folder

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "scripts" / "lambda_instance.py"


@pytest.fixture
def remote(run_stack: Runner):
    return run_stack("remote70b")


def test_instance_is_created_and_deleted_through_the_lambda_api(remote) -> None:
    mocks, outputs = remote
    (instance,) = mocks.of_type("command:local:Command")
    # Relative to infra/ (Pulumi.yaml's `main`, where Pulumi runs it): a destroy from another checkout or CI can run it.
    assert instance.inputs["create"] == "python3 scripts/lambda_instance.py create"
    assert instance.inputs["delete"] == "python3 scripts/lambda_instance.py delete"
    assert instance.delete_before_replace  # a new region or type terminates the old instance first
    env = instance.inputs["environment"]
    env = env["value"] if "value" in env else env
    assert env["LAMBDA_REGION"] == "us-west-2" and env["LAMBDA_INSTANCE_TYPE"] == "gpu_2x_a100"
    assert env["LAMBDA_INSTANCE_NAME"] == "dreamseed-70b"
    # Lambda's current API host (cloud.lambdalabs.com is the old name), by default and in the stack file.
    assert env["LAMBDA_API_URL"] == "https://cloud.lambda.ai/api/v1"
    stack_file = (SCRIPT.parents[2] / "Pulumi.remote70b.yaml").read_text(encoding="utf-8")
    assert "lambdalabs.com" not in stack_file and "lambdalabs.com" not in SCRIPT.read_text(encoding="utf-8")
    assert outputs["instanceId"] == (INSTANCE["id"], False)
    assert outputs["publicIp"] == (INSTANCE["ip"], False)


def test_bootstrap_runs_the_70b_with_the_seed_flags_over_ssh(remote) -> None:
    mocks, outputs = remote
    server = remote_command(mocks, "gpu-host-vllm")
    script = server.inputs["create"]
    run = script[script.index("$DOCKER run"):]
    # The pre-quantized 70B (4-bit AWQ: fits two 40 GB A100s), served under the catalog's model id.
    assert ("--model hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4 "
            "--served-model-name meta-llama/Llama-3.1-70B-Instruct") in run
    assert "--tensor-parallel-size 2" in run and "--max-model-len 8192" in run
    assert "--gpu-memory-utilization 0.9 " in run  # 0.90, written as vLLM parses it
    # The key reaches vLLM through its environment, never its command line (ps, docker inspect).
    assert "--api-key" not in script and '--env-file "$envfile"' in run and "--gpus all" in run
    assert "-p 127.0.0.1:8000:8000" in run  # never open to the internet
    assert "$DOCKER pull vllm/vllm-openai:v0.11.0" in script and images.is_pinned("vllm/vllm-openai:v0.11.0")
    assert "until curl -sf -o /dev/null http://127.0.0.1:8000/health" in script  # waits for health
    # No delete: terminating the instance ends the server, and a delete would dial a host the
    # auto-stop may already have ended (tests/stacks/test_rehearsal.py). A re-run replaces the old container.
    assert "delete" not in server.inputs
    assert "--filter label=dreamseed.role=model-server" in script
    assert any("gpu-host-host-key" in dependency for dependency in server.dependencies)
    assert outputs["url"] == ("http://127.0.0.1:8000", False)
    assert outputs["port"] == (8000, False)


def test_an_instance_type_smaller_than_the_planned_host_is_refused_at_preview(run_stack) -> None:
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("remote70b", {"dreamseed:instanceType": "gpu_1x_a100"})
    message = str(refused.value)
    assert ("dreamseed:instanceType gpu_1x_a100 has 1 x 40 GiB GPUs, but backends.yaml plans host 'lambda-2xa100' "
            "as 2 x 40 GiB") in message
    assert "gpu_2x_a100" in message and "gpu_2x_h100_sxm5" in message
    # The default is a real Lambda type, and one the catalog's plan fits.
    assert CATALOG["gpu_2x_a100"][0] == "2x A100 (40 GB SXM4)"
    run_stack("remote70b", {"dreamseed:instanceType": "gpu_2x_h100_sxm5"})  # bigger GPUs: fine


def test_remote_secrets_stay_secret(remote) -> None:
    mocks, outputs = remote
    for record in mocks.resources:
        for name, value in SECRETS.items():
            assert plain_occurrences(record.inputs, value) == 0, f"{name} in plain text in {record.name}"
    server = remote_command(mocks, "gpu-host-vllm")
    # Secrets reach the host on standard input, never in the command text.
    assert secret_occurrences(server.inputs["stdin"], SECRETS["hfToken"]) == 1
    assert secret_occurrences(server.inputs["stdin"], SECRETS["vllmApiKey"]) == 1
    assert secret_occurrences(server.inputs["connection"], SECRETS["sshPrivateKey"]) == 1
    (instance,) = mocks.of_type("command:local:Command")
    assert secret_occurrences(instance.inputs["environment"], SECRETS["lambdaApiKey"]) == 1
    assert outputs["apiKey"] == (SECRETS["vllmApiKey"], True)
    # The tunnel's restricted key is a secret output; the host key to pin is public.
    assert outputs["tunnelPrivateKey"] == (TUNNEL_KEY, True) and outputs["sshHostKey"] == (HOST_KEY, False)
    # The key is printed, so its command's output is never streamed to the console.
    assert remote_command(mocks, "gpu-host-tunnel-access").inputs["logging"] == "none"
    access = remote_command(mocks, "gpu-host-tunnel-access")
    assert "permitopen=\"127.0.0.1:8000\"" in access.inputs["create"] and "restrict," in access.inputs["create"]


def test_every_catalog_backend_on_the_remote_host_is_served(remote) -> None:
    mocks, outputs = remote
    assert outputs["backend"] == ("general70", False)
    plan, _ = outputs["gpuMemoryPlan"]
    assert (plan["host"], plan["gpuCount"], plan["gpuMemoryGib"], plan["budgetGib"]) == ("lambda-2xa100", 2, 40.0, 38.0)
    assert plan["backends"]["general70"] == {
        "onDemand": False, "shareGib": 36.0, "weightsGib": 18.5, "kvCacheGib": 16.5, "kvTokens": 108134,
        "kvTokensNeeded": 32768, "headroomGib": 11.5}
    assert plan["alwaysOnGib"] == plan["worstCaseGib"] == 37.0
    for record in mocks.of_type("command:remote:Command") + mocks.of_type("command:local:Command"):
        assert "$dreamseed:index:RemoteGpuHost" in record.parent


# --- the instance script against a fake Lambda Cloud API ------------------------------------


@pytest.fixture
def fake_lambda(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    cloud = FakeCloud(tmp_path / "hosts")
    yield cloud.url, cloud.state
    cloud.stop()


def run_script(action: str, api_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"LAMBDA_API_URL": api_url, "LAMBDA_API_KEY": "test-key", "LAMBDA_REGION": "us-east-1",
            "LAMBDA_INSTANCE_TYPE": "gpu_2x_h100_sxm5", "LAMBDA_INSTANCE_NAME": "dreamseed-70b",
            "LAMBDA_SSH_KEY_NAME": "dreamseed", "LAMBDA_POLL_SECONDS": "0.01", "LAMBDA_WAIT_SECONDS": "10",
            **FakeCloud.by_url[api_url].script_env()}
    return subprocess.run([sys.executable, str(SCRIPT), action], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **base, **env})


def test_script_launches_waits_for_active_and_terminates(fake_lambda) -> None:
    url, state = fake_lambda
    created = run_script("create", url)
    assert created.returncode == 0, created.stderr
    instance = json.loads(created.stdout)
    assert instance == {"id": "inst1", "ip": "127.0.0.11", "name": "dreamseed-70b", "region": "us-east-1",
                        "instance_type": "gpu_2x_h100_sxm5"}
    assert "launching gpu_2x_h100_sxm5 (2x H100 (80 GB SXM5)), $5.98/hour in us-east-1" in created.stderr
    launch = state["calls"][0]
    assert launch == ("/api/v1/instance-operations/launch", {
        "region_name": "us-east-1", "instance_type_name": "gpu_2x_h100_sxm5", "ssh_key_names": ["dreamseed"],
        "quantity": 1, "name": "dreamseed-70b"})

    again = run_script("create", url)  # a retried `pulumi up` reuses the running instance
    assert json.loads(again.stdout)["id"] == "inst1" and len(state["calls"]) == 1

    deleted = run_script("delete", url, PULUMI_COMMAND_STDOUT=created.stdout)
    assert deleted.returncode == 0, deleted.stderr
    assert state["calls"][-1] == ("/api/v1/instance-operations/terminate", {"instance_ids": ["inst1"]})
    assert state["instances"] == {}
    # Deleting what is already gone does not block `pulumi destroy`.
    assert run_script("delete", url, PULUMI_COMMAND_STDOUT=created.stdout).returncode == 0


def test_script_reports_api_errors_clearly(fake_lambda) -> None:
    url, state = fake_lambda
    state["no_capacity"] = True
    failed = run_script("create", url)
    assert failed.returncode == 1
    assert "insufficient-capacity" in failed.stderr and "Not enough capacity" in failed.stderr
    wrong_key = run_script("create", url, LAMBDA_API_KEY="nope")
    assert wrong_key.returncode == 1 and "HTTP 401" in wrong_key.stderr and "nope" not in wrong_key.stderr
    assert run_script("delete", url).returncode == 1  # nothing recorded to delete
    assert run_script("bogus", url).returncode == 2


def test_a_destroy_from_another_checkout_terminates_the_instance(remote, fake_lambda, tmp_path: Path) -> None:
    mocks, _ = remote
    (instance,) = mocks.of_type("command:local:Command")
    url, state = fake_lambda
    created = run_script("create", url)
    other = tmp_path / "another-checkout"  # CI's, say: the stored delete command runs in its `main` folder
    (other / "infra" / "scripts").mkdir(parents=True)
    (other / "infra" / "scripts" / SCRIPT.name).write_bytes(SCRIPT.read_bytes())
    (other / "Pulumi.yaml").write_bytes((SCRIPT.parents[2] / "Pulumi.yaml").read_bytes())
    env = {"LAMBDA_API_URL": url, "LAMBDA_API_KEY": "test-key", "PULUMI_COMMAND_STDOUT": created.stdout}
    deleted = subprocess.run(["/bin/sh", "-c", instance.inputs["delete"]], cwd=main_folder(other), capture_output=True,
                             text=True, timeout=30, env={**os.environ, **env})
    assert deleted.returncode == 0, deleted.stderr
    assert state["instances"] == {}


def test_only_an_instance_of_the_same_name_type_and_region_is_reused(fake_lambda) -> None:
    url, state = fake_lambda
    first = json.loads(run_script("create", url).stdout)
    moved = run_script("create", url, LAMBDA_REGION="us-south-1")  # the replacement after a region change
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["id"] != first["id"] and json.loads(moved.stdout)["region"] == "us-south-1"
    other = run_script("create", url, LAMBDA_INSTANCE_TYPE="gpu_1x_a100")
    assert json.loads(other.stdout)["instance_type"] == "gpu_1x_a100"
    launches = [body for path, body in state["calls"] if path.endswith("/launch")]
    assert len(launches) == 3


def test_a_create_that_times_out_terminates_what_it_launched(fake_lambda) -> None:
    url, state = fake_lambda
    state["stuck"] = True  # the instance never becomes active
    failed = run_script("create", url, LAMBDA_WAIT_SECONDS="0.3")
    assert failed.returncode == 1 and "terminated it, so it is not billed" in failed.stderr
    assert state["instances"] == {}  # nothing left running outside Pulumi's state
    assert state["calls"][-1] == ("/api/v1/instance-operations/terminate", {"instance_ids": ["inst1"]})


def test_a_type_or_region_without_capacity_fails_before_launching_and_says_what_is_free(fake_lambda) -> None:
    url, state = fake_lambda
    busy = run_script("create", url, LAMBDA_REGION="us-west-2")
    assert busy.returncode == 1 and "no gpu_2x_h100_sxm5 is free in us-west-2 now" in busy.stderr
    assert "gpu_2x_h100_sxm5 in us-east-1, us-south-1" in busy.stderr and "gpu_1x_a100 in us-east-1" in busy.stderr
    assert "gpu_2x_a100 in" not in busy.stderr  # no capacity anywhere: not offered as an alternative
    unknown = run_script("create", url, LAMBDA_INSTANCE_TYPE="gpu_2x_a100_80gb")  # the old default: not a Lambda type
    assert unknown.returncode == 1 and "Lambda offers no instance type 'gpu_2x_a100_80gb'" in unknown.stderr
    assert "gpu_8x_a100_80gb_sxm4" in unknown.stderr and "dreamseed:instanceType" in unknown.stderr
    assert state["calls"] == []  # nothing was launched, nothing is billed


# --- preview asks Lambda's API whether `up` could launch ---------------------------------------


def test_preview_refuses_a_type_or_region_without_capacity_naming_what_is_free(run_stack: Runner, fake_lambda) -> None:
    url, state = fake_lambda
    with pytest.raises(pulumi.RunError) as refused:
        run_stack("remote70b", {"dreamseed:lambdaApiUrl": url, "dreamseed:lambdaApiKey": "test-key"}, preview=True)
    message = str(refused.value)  # the default gpu_2x_a100 has no capacity anywhere in the fake catalog
    assert "Lambda Cloud: no gpu_2x_a100 is free in us-west-2 now" in message
    assert "gpu_2x_h100_sxm5 in us-east-1, us-south-1" in message and "Set dreamseed:region" in message
    assert not [call for call in state["calls"] if call[0].endswith("/launch")]  # nothing launched

    # With capacity, the filesystem must be in the region too.
    settings = {"dreamseed:lambdaApiUrl": url, "dreamseed:lambdaApiKey": "test-key",
                "dreamseed:instanceType": "gpu_2x_h100_sxm5", "dreamseed:region": "us-east-1"}
    with pytest.raises(pulumi.RunError, match="persistent filesystem 'dreamseed-models' is not in us-east-1"):
        run_stack("remote70b", settings, preview=True)
    state["file_systems"] = [{"id": "fs1", "name": "dreamseed-models", "region": {"name": "us-east-1"}}]
    run_stack("remote70b", settings, preview=True)

    # A wrong key is named as such, without the key.
    with pytest.raises(pulumi.RunError) as bad_key:
        run_stack("remote70b", {**settings, "dreamseed:lambdaApiKey": "nope-SECRET"}, preview=True)
    assert "HTTP 401" in str(bad_key.value) and "nope-SECRET" not in str(bad_key.value)


def test_preview_accepts_the_running_instance_even_when_its_type_is_sold_out(run_stack: Runner, fake_lambda) -> None:
    url, state = fake_lambda
    state["instances"]["inst9"] = {"id": "inst9", "name": "dreamseed-70b", "status": "active", "ip": "203.0.113.9",
                                   "region": {"name": "us-west-2"}, "instance_type": {"name": "gpu_2x_a100"}}
    run_stack("remote70b", {"dreamseed:lambdaApiUrl": url, "dreamseed:lambdaApiKey": "test-key"}, preview=True)


def test_preview_goes_on_when_lambdas_api_cannot_be_reached(run_stack: Runner) -> None:
    # Nothing listens on port 9: the create command checks again before it launches.
    run_stack("remote70b", {"dreamseed:lambdaApiUrl": "http://127.0.0.1:9/api/v1"}, preview=True)
