"""`dreamseed policies check`: every mistake is named by file, line and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreamseed.policy import PolicyError, load_policies
from support import ROOT, SEED_POLICIES


def check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "check", str(directory)],
                          capture_output=True, text=True)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(SEED_POLICIES, target)
    return target


def edit(directory: Path, file: str, old: str, new: str) -> None:
    path = directory / file
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def line_of(directory: Path, file: str, needle: str) -> int:
    lines = (directory / file).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def test_seed_policies_pass() -> None:
    result = check(SEED_POLICIES)
    assert result.returncode == 0, result.stderr
    assert "OK (4 backends: general, code, fast, general70; 4 routing rules)" in result.stdout
    assert "  rag: retrieval for rules default\n" in result.stdout
    assert "  scale: on demand code (docker, cold start fallback)\n" in result.stdout


def test_seed_catalog_matches_the_roadmap() -> None:
    catalog = load_policies(SEED_POLICIES).catalog
    expected = {
        "general": ("http://127.0.0.1:8000", "mistralai/Mistral-7B-Instruct-v0.3", 16, False),
        "code": ("http://127.0.0.1:8001", "Qwen/Qwen2.5-Coder-7B-Instruct", 16, True),
        "fast": ("http://127.0.0.1:8002", "microsoft/Phi-3-mini-4k-instruct", 16, False),
        "general70": (None, "meta-llama/Llama-3.1-70B-Instruct", 4, False),
    }
    for name, (url, model, concurrency, on_demand) in expected.items():
        backend = catalog.backends[name]
        assert (backend.url, backend.model, backend.max_concurrency, backend.on_demand) == (url, model, concurrency, on_demand)
    remote = catalog.backends["general70"]
    assert (remote.url_env, remote.api_key_env) == ("DREAMSEED_GENERAL70_URL", "DREAMSEED_GENERAL70_API_KEY")
    t = remote.timeouts
    assert (t.connect, t.read, t.write, t.pool) == (30, 120, 120, 30)
    assert remote.resolve_url({"DREAMSEED_GENERAL70_URL": "https://h:8000/"}) == "https://h:8000"
    assert remote.resolve_url({}) is None
    assert catalog.hosts["rtx5090"].gpu_memory_gb == 32


@pytest.mark.parametrize(
    ("file", "old", "new", "needle", "expected"),
    [
        # wrong type
        ("backends.yaml", "max_concurrency: 4", "max_concurrency: four", "max_concurrency: four",
         "backends.general70.max_concurrency: Expected `int`, got `str`"),
        # out of range
        ("backends.yaml", "gpu_memory_utilization: 0.20", "gpu_memory_utilization: 1.5", "gpu_memory_utilization: 1.5",
         "backends.fast.gpu_memory_utilization: Expected `float` <= 1"),
        # misspelt field
        ("backends.yaml", "    context_length: 4096", "    context_lenght: 4096", "context_lenght",
         "backends.fast.context_lenght: unknown field 'context_lenght'"),
        # missing required field
        ("backends.yaml", "    context_length: 4096\n", "", "  fast:",
         "backends.fast: Object missing required field `context_length`"),
        # URL with a path
        ("backends.yaml", "url: http://127.0.0.1:8002", "url: http://127.0.0.1:8002/v1", "8002/v1",
         "backends.fast.url: give the server's base URL without a path"),
        # unknown host
        ("backends.yaml", "host: lambda-2xa100", "host: lambda", "host: lambda",
         "backends.general70.host: unknown host 'lambda' (known: lambda-2xa100, rtx5090)"),
        # dangling target
        ("routing.yaml", "target: fast", "target: fsat", "target: fsat",
         "rules[2].target: unknown backend 'fsat' (known: code, fast, general, general70)"),
        # dangling fallback
        ("routing.yaml", "fallback: [general, fast]", "fallback: [genral, fast]", "fallback: [genral, fast]",
         "rules[0].fallback[0]: unknown backend 'genral'"),
        # fallback cycle
        ("routing.yaml", "    target: code\n    fallback: [general, fast]", "    target: code\n    fallback: [general, code]",
         "fallback: [general, code]", "rules[1].fallback: fallback cycle: code -> general -> code repeats a backend"),
        # bad regex
        ("routing.yaml", "      chars_over: 2000", "      chars_over: 2000\n      regex: '(unclosed'", "regex:",
         "rules[0].match.regex: invalid regular expression"),
        # wrong scope value
        ("routing.yaml", "scope: all", "scope: everything", "scope: everything",
         "rules[0].match.scope: Invalid enum value 'everything'"),
        # empty keyword list
        ("routing.yaml", "keywords: [빠른, 빨리, 간단히, fast, quick, quickly]", "keywords: []", "keywords: []",
         "rules[2].match.keywords: Expected `array` of length >= 1"),
    ],
)
def test_each_mistake_names_file_line_and_field(policies: Path, file: str, old: str, new: str, needle: str,
                                                expected: str) -> None:
    edit(policies, file, old, new)
    result = check(policies)
    assert result.returncode == 1
    line = line_of(policies, file, needle)
    assert f"{policies / file}:{line}: {expected}" in result.stderr, result.stderr


def test_yaml_syntax_error_has_a_line(policies: Path) -> None:
    edit(policies, "routing.yaml", "  - name: fast\n", "  - name: fast\n    target: [unclosed\n")
    result = check(policies)
    assert result.returncode == 1
    assert f"{policies / 'routing.yaml'}:" in result.stderr and "invalid YAML" in result.stderr


def test_duplicate_keys_are_refused_not_silently_merged(policies: Path) -> None:
    edit(policies, "backends.yaml", "    max_concurrency: 4\n", "    max_concurrency: 4\n    max_concurrency: 8\n")
    result = check(policies)
    first = line_of(policies, "backends.yaml", "max_concurrency: 4")
    assert result.returncode == 1
    assert f"backends.yaml:{first + 1}: duplicate key 'max_concurrency' (first defined on line {first})" in result.stderr


def test_rules_after_a_catch_all_are_unreachable_and_a_catch_all_is_required(policies: Path) -> None:
    edit(policies, "routing.yaml", "  - name: fast\n", "  - name: early-default\n    target: general\n\n  - name: fast\n")
    result = check(policies)
    assert "rules[3]: unreachable: rule 'early-default' before it matches every request" in result.stderr

    text = (policies / "routing.yaml").read_text(encoding="utf-8")
    cut = text.index("  - name: early-default")
    (policies / "routing.yaml").write_text(text[:cut], encoding="utf-8")
    result = check(policies)
    assert "rules: no catch-all rule" in result.stderr


def test_alias_may_not_shadow_a_backend(policies: Path) -> None:
    edit(policies, "routing.yaml", "      keywords: [빠른", "      models: [general]\n      keywords: [빠른")
    result = check(policies)
    assert "rules[2].match.models[0]: 'general' is already a backend" in result.stderr


def test_gpu_budget_refuses_an_oversubscribed_host(policies: Path) -> None:
    edit(policies, "backends.yaml", "gpu_memory_utilization: 0.20", "gpu_memory_utilization: 0.65")
    result = check(policies)
    assert result.returncode == 1
    assert "hosts.rtx5090: always-on backends claim 1.00 of the GPU memory (32.0 GB of 32 GB)" in result.stderr


def test_gpu_budget_refuses_an_on_demand_backend_that_could_never_start(policies: Path) -> None:
    edit(policies, "backends.yaml", "gpu_memory_utilization: 0.20", "gpu_memory_utilization: 0.30")
    result = check(policies)
    assert "backends.code.gpu_memory_utilization: on-demand backend can never start" in result.stderr


def test_all_problems_are_reported_at_once(policies: Path) -> None:
    edit(policies, "routing.yaml", "target: fast", "target: fsat")
    edit(policies, "routing.yaml", "target: code", "target: cdoe")
    with pytest.raises(PolicyError) as caught:
        load_policies(policies)
    assert len(caught.value.problems) == 2


def test_missing_file_and_directory(tmp_path: Path) -> None:
    result = check(tmp_path)
    assert result.returncode == 1
    assert "backends.yaml: file not found" in result.stderr and "routing.yaml: file not found" in result.stderr


def test_top_level_must_be_a_mapping(policies: Path) -> None:
    (policies / "routing.yaml").write_text("- just\n- a list\n", encoding="utf-8")
    result = check(policies)
    assert f"{policies / 'routing.yaml'}:1: expected a mapping at the top level" in result.stderr


def test_generated_schema_and_reference_are_current_and_the_shipped_files_use_them() -> None:
    """docs/schema/*.schema.json and docs/policy-reference.md are generated from the Structs:
    a schema change without `dreamseed policies docs --write` fails here."""
    from dreamseed.docs import generated
    from dreamseed.policy.reference import FILES, schema_name

    stale = [str(path) for path, content in generated(ROOT).items()
             if not path.exists() or path.read_text(encoding="utf-8") != content]
    assert not stale, f"regenerate with `dreamseed docs --write`: {stale}"
    for policy_file in FILES:
        first = (SEED_POLICIES / policy_file).read_text(encoding="utf-8").splitlines()[0]
        assert first == f"# yaml-language-server: $schema=../docs/schema/{schema_name(policy_file)}"
        assert (SEED_POLICIES / first.split("=", 1)[1]).resolve().is_file()


def test_docs_command_reports_stale_files(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "docs", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "stale: " in result.stdout and "policy-reference.md" in result.stdout
    written = subprocess.run([sys.executable, "-m", "dreamseed.cli", "docs", "--root", str(tmp_path), "--write"],
                             capture_output=True, text=True)
    assert written.returncode == 0 and (tmp_path / "docs" / "schema" / "scale.schema.json").is_file()
    again = subprocess.run([sys.executable, "-m", "dreamseed.cli", "docs", "--root", str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == ""
