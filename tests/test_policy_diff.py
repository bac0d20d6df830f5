"""`dreamseed policies diff`: what a policy change does, in the policies' terms and on real traffic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreamseed.policy import load_policies
from dreamseed.replay import read_traffic, replay
from dreamseed.routing import Prompt
from support import ROOT, SEED_POLICIES, edit

TRAFFIC = ROOT / "docs" / "examples" / "traffic.jsonl"


def diff(base: Path, head: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "diff", str(base), str(head), *extra],
                          capture_output=True, text=True)


@pytest.fixture
def head(tmp_path: Path) -> Path:
    target = tmp_path / "head"
    shutil.copytree(SEED_POLICIES, target)
    return target


def test_the_sample_traffic_is_varied_and_the_seed_rules_tell_it_apart() -> None:
    traffic = read_traffic(TRAFFIC)
    assert len(traffic.requests) >= 300 and not traffic.unreadable
    seed = load_policies(SEED_POLICIES)
    result = replay(seed, seed, traffic)
    assert set(result.before.backends) == {"general", "code", "fast", "general70"}
    assert all(count >= 10 for count in result.before.backends.values()), result.before.backends
    texts = [r.prompt.text("all") for r in traffic.requests]
    assert any("코드" in t for t in texts) and any("빠른" in t for t in texts) and any(len(t) > 2000 for t in texts)
    assert not result.moved  # the same policies move nothing


def test_the_replay_agrees_with_dreamseed_route_on_every_sample_request() -> None:
    """The replay is the proxy's Router; `dreamseed route` is too. Checked request by request for the
    sample's distinct user texts (one subprocess each would take minutes for all 400)."""
    traffic = read_traffic(TRAFFIC)
    seed = load_policies(SEED_POLICIES)
    from dreamseed.routing import Router

    router = Router(seed.routing, seed.catalog)
    seen: set[str] = set()
    for request in traffic.requests:
        text = request.prompt.text("all")
        if request.model != "auto" or text in seen or len(request.prompt.text("user")) != len(text):
            continue  # `route` takes one user text: single-message requests for `auto`
        seen.add(text)
        routed = subprocess.run([sys.executable, "-m", "dreamseed.cli", "route", "-"], input=text, capture_output=True,
                                text=True, check=True).stdout
        decision = router.route(request.model, Prompt.of_text(text))
        assert f"rule: {decision.rule}\nbackend: {decision.backend}" in routed, (text[:60], routed)
    assert len(seen) >= 20


def test_a_moved_keyword_and_a_changed_threshold_move_the_requests_they_should(head: Path) -> None:
    edit(head, "routing.yaml", "                 sql, regex, compile, refactor]", "                 regex, compile, refactor]")
    edit(head, "routing.yaml", "keywords: [빠른, 빨리, 간단히, fast, quick, quickly]",
         "keywords: [빠른, 빨리, 간단히, fast, quick, quickly, sql]")
    edit(head, "routing.yaml", "      chars_over: 2000", "      chars_over: 3000")
    result = diff(SEED_POLICIES, head, "--traffic", str(TRAFFIC))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "code: match.keywords: -[sql]" in out and "fast: match.keywords: +[sql]" in out
    assert "long-prompt: match.chars_over: 2000 -> 3000" in out
    base, moved = load_policies(SEED_POLICIES), load_policies(head)
    replayed = replay(base, moved, read_traffic(TRAFFIC))
    moves = {(a, b, c, d): n for (a, b, c, d), n in replayed.moved.items()}
    assert set(moves) <= {("code", "code", "fast", "fast"), ("long-prompt", "general70", "default", "general")}
    assert moves.get(("code", "code", "fast", "fast"), 0) >= 1 and moves.get(("long-prompt", "general70", "default",
                                                                                 "general"), 0) >= 1
    for (rule_from, backend_from, rule_to, backend_to), count in moves.items():
        assert f"{count:6d}  {rule_from}/{backend_from} -> {rule_to}/{backend_to}" in out
    sql = [r for r in read_traffic(TRAFFIC).requests if "SQL" in r.prompt.text("user")]
    assert sql and moves[("code", "code", "fast", "fast")] == len(sql)
    assert f"general70 (lambda-2xa100): {replayed.before.backends['general70']} -> " \
           f"{replayed.after.backends['general70']}" in out


def test_a_removed_fallback_and_a_changed_backend_limit_are_named(head: Path) -> None:
    edit(head, "routing.yaml", "    target: general\n    fallback: [fast]", "    target: general")
    edit(head, "backends.yaml", "max_concurrency: 4", "max_concurrency: 2")
    result = diff(SEED_POLICIES, head)
    assert result.returncode == 0, result.stderr
    assert "default: fallback: -[fast]" in result.stdout
    assert "fast: max_concurrency: 4 -> 2" in result.stdout


def test_a_backend_that_no_longer_fits_makes_the_head_invalid_with_the_numbers(head: Path) -> None:
    edit(head, "backends.yaml", "gpu_memory_utilization: 0.20", "gpu_memory_utilization: 0.65")
    result = diff(SEED_POLICIES, head, "--format", "markdown")
    assert result.returncode == 1
    assert "**Invalid:**" in result.stdout and "always-on backends need 35.1 GiB per GPU" in result.stdout


def test_a_head_that_fails_check_exits_1_and_an_invalid_base_exits_2(head: Path, tmp_path: Path) -> None:
    edit(head, "routing.yaml", "target: fast", "target: fsat")
    result = diff(SEED_POLICIES, head)
    assert result.returncode == 1 and "unknown backend 'fsat'" in result.stderr
    assert diff(head, SEED_POLICIES).returncode == 2


def test_unreadable_traffic_lines_are_counted_and_named_not_dropped(tmp_path: Path) -> None:
    traffic = tmp_path / "traffic.jsonl"
    access_line = {"ts": 1.0, "request_id": "r", "endpoint": "chat", "stream": False, "rule": "code",
                   "backend": "code", "status": 200, "prompt": "파이썬 코드를 짜 주세요"}
    traffic.write_text("\n".join([
        json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hello"}]}),
        "{not json",
        json.dumps({"request_id": "x", "rule": "default", "backend": "general", "status": 200}),  # no --log-prompts
        json.dumps(access_line, ensure_ascii=False),
        json.dumps(["a", "list"]),
    ]) + "\n", encoding="utf-8")
    result = diff(SEED_POLICIES, SEED_POLICIES, "--traffic", str(traffic))
    assert result.returncode == 0, result.stderr
    assert "2 requests replayed" in result.stdout
    assert ("3 line(s) could not be read (line 2: not JSON: Expecting property name enclosed in double quotes, line 3: "
            "an access log line without `prompt` (written without --log-prompts), line 5: not a JSON object)") \
        in result.stdout
    read = read_traffic(traffic)
    assert [r.line for r in read.requests] == [1, 4]


def test_markdown_is_a_pull_request_comment(head: Path) -> None:
    edit(head, "routing.yaml", "      chars_over: 2000", "      chars_over: 3000")
    result = diff(SEED_POLICIES, head, "--traffic", str(TRAFFIC), "--format", "markdown")
    assert result.returncode == 0
    out = result.stdout
    assert out.startswith("## DreamSeed policy diff\n")
    assert "- `long-prompt`: match.chars_over: 2000 -> 3000" in out
    assert "| requests | from (rule → backend) | to (rule → backend) | for example |" in out
    assert "| general70 (lambda-2xa100) |" in out


def test_the_coders_starts_follow_its_triggers_over_the_traffics_times(head: Path) -> None:
    """Keyword starts off in scale.yaml: the coder starts only on volume (more than 10 coding requests
    in 10 minutes), which the sample's pace (about 85 in nine hours) never reaches."""
    edit(head, "scale.yaml", "      keywords: true", "      keywords: false")
    base, changed = load_policies(SEED_POLICIES), load_policies(head)
    result = replay(base, changed, read_traffic(TRAFFIC))
    assert result.timed and result.before.starts["code"] >= 1  # started by a keyword, idle-stopped, started again
    assert result.after.keyword_starts["code"] == 0 < result.before.keyword_starts["code"]
    assert result.after.starts["code"] == 0
    edit(head, "scale.yaml", "        requests: 11", "        requests: 2")  # two in ten minutes: volume fires
    assert replay(base, load_policies(head), read_traffic(TRAFFIC)).after.starts["code"] >= 1


def test_the_pull_request_workflow_diffs_against_the_base_and_fails_on_an_invalid_head() -> None:
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "policy-diff.yml").read_text(encoding="utf-8"))
    assert workflow[True]["pull_request"]["paths"][0] == "policies/**"  # YAML 1.1 reads the `on` key as True
    steps = {step.get("name", ""): step for step in workflow["jobs"]["diff"]["steps"]}
    assert "github.event.pull_request.base.sha" in steps["the base branch's policies"]["run"]
    command = steps["policies diff"]["run"]
    assert 'dreamseed policies diff "$RUNNER_TEMP/base/policies" policies' in command
    assert "--traffic docs/examples/traffic.jsonl --format markdown" in command
    assert "gh pr comment" in steps["comment on the pull request"]["run"]
    assert steps["policies check"]["if"] == "steps.diff.outputs.status != '0'"
    assert workflow["permissions"]["pull-requests"] == "write"
