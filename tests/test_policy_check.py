"""`dreamseed policies check`: every mistake is named by file, line and field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreamseed.policy import PolicyError, load_policies, memory_plan
from support import ROOT, SEED_POLICIES, edit


def check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "check", str(directory)],
                          capture_output=True, text=True)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(SEED_POLICIES, target)
    return target


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
        # The roadmap's 16 at once for the 7B class do not fit one 32 GB card with a KV cache for every
        # request at full context (see test_the_seed_gpu_plan_fits_with_every_request_at_full_context).
        "general": ("http://127.0.0.1:8000", "mistralai/Mistral-7B-Instruct-v0.3", 8, False),
        "code": ("http://127.0.0.1:8001", "Qwen/Qwen2.5-Coder-7B-Instruct", 8, True),
        "fast": ("http://127.0.0.1:8002", "microsoft/Phi-3-mini-4k-instruct", 4, False),
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
    assert catalog.hosts["rtx5090"].gpu_memory_gb == 31.8  # 32,607 MiB, as nvidia-smi reports an RTX 5090


@pytest.mark.parametrize(
    ("file", "old", "new", "needle", "expected"),
    [
        # wrong type
        ("backends.yaml", "max_concurrency: 4", "max_concurrency: four", "max_concurrency: four",
         "backends.fast.max_concurrency: Expected `int`, got `str`"),
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
    # The shares plus 1 GiB per process outside them (CUDA context and graphs) against the card less headroom.
    assert ("hosts.rtx5090: always-on backends need 35.1 GiB per GPU (shares 0.39 + 0.65 of 31.8 GiB, plus 1 GiB "
            "each outside the share) but 30.2 GiB are left after 5% headroom") in result.stderr


def test_gpu_budget_refuses_an_on_demand_backend_that_could_never_start(policies: Path) -> None:
    edit(policies, "backends.yaml", "gpu_memory_utilization: 0.20", "gpu_memory_utilization: 0.30")
    result = check(policies)
    assert ("backends.code.gpu_memory_utilization: on-demand backend can never start: its 9.3 GiB (share 0.26 plus "
            "1 GiB outside it) on top of the always-on 23.9 GiB exceed rtx5090's 30.2 GiB") in result.stderr


def test_the_seed_gpu_plan_fits_with_every_request_at_full_context() -> None:
    catalog = load_policies(SEED_POLICIES).catalog
    local = memory_plan(catalog, "rtx5090")
    for name in ("general", "code", "fast"):
        backend, planned = catalog.backends[name], local.backends[name]
        assert planned.declared and planned.kv_tokens_needed == backend.context_length * backend.max_concurrency
        assert planned.kv_tokens_available >= planned.kv_tokens_needed and planned.headroom_gib > 0
        assert planned.load_time_quantization is None and planned.load_peak_gib == planned.weights_gib
    assert local.worst_case_gib <= local.budget_gib  # general + fast running, the coder started on demand
    remote = memory_plan(catalog, "lambda-2xa100").backends["general70"]
    assert remote.weights_gib == pytest.approx(37.0 / 2)  # tensor parallel: half the weights on each GPU
    assert remote.kv_tokens_available >= remote.kv_tokens_needed == 8192 * 4


def test_a_load_time_quantized_coder_is_refused_with_its_peak_and_the_free_memory(policies: Path) -> None:
    # The catalog before this plan: the bf16 coder with vLLM's load-time --quantization fp8.
    edit(policies, "backends.yaml", """    checkpoint: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ         # Qwen's own 4-bit AWQ build
""", "")
    edit(policies, "backends.yaml", "memory: {weights_gib: 5.3, weights_dtype: int4, kv_cache_kib_per_token: 56}",
         "memory: {weights_gib: 14.2, weights_dtype: bf16, kv_cache_kib_per_token: 56}")
    edit(policies, "backends.yaml", "weights_gib: 14.2, weights_dtype: bf16, kv_cache_kib_per_token: 56}\n"
         "    image: vllm/vllm-openai:v0.11.0\n    args: [--kv-cache-dtype, fp8]",
         "weights_gib: 14.2, weights_dtype: bf16, kv_cache_kib_per_token: 56}\n"
         "    image: vllm/vllm-openai:v0.11.0\n    args: [--kv-cache-dtype, fp8, --quantization, fp8]")
    result = check(policies)
    assert result.returncode == 1
    line = line_of(policies, "backends.yaml", "--quantization, fp8")
    assert (f"backends.yaml:{line}: backends.code.args: --quantization fp8 quantizes while loading, so vLLM first puts "
            "the 14.2 GiB of 16-bit weights on the GPU, but only 9.4 GiB are free when it starts next to general, fast: "
            "use a pre-quantized `checkpoint`") in result.stderr
    plan = subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "plan", str(policies)],
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 1 and "backends.code.args: --quantization fp8 quantizes while loading" in plan.stderr
    code_row = next(line for line in plan.stdout.splitlines() if line.startswith("code "))
    assert code_row.split()[5:7] == ["7.1", "14.2"]  # fp8 as it runs, 16-bit while loading


def test_a_kv_cache_too_small_for_the_admitted_requests_is_refused(policies: Path) -> None:
    # 16 requests of 8,192 tokens need 8 GiB of fp8 KV cache beside general's 7 GiB of weights.
    edit(policies, "backends.yaml", "max_concurrency: 8", "max_concurrency: 16")
    result = check(policies)
    assert result.returncode == 1
    assert ("backends.general.gpu_memory_utilization: needs 16.0 GiB per GPU (weights 7.0, activations 1.0, KV cache "
            "8.0 for 131,072 tokens = context_length x max_concurrency) but its share 0.39 of 31.8 GiB is 12.4 GiB: "
            "raise it to at least 0.50, or lower max_concurrency or context_length\n") in result.stderr
    edit(policies, "backends.yaml", "args: [--kv-cache-dtype, fp8]", "args: []")  # general's: 16-bit KV cache now
    assert "or halve the KV cache with --kv-cache-dtype fp8" in check(policies).stderr


def test_policies_plan_prints_each_hosts_plan_for_a_person() -> None:
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "plan", str(SEED_POLICIES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["backend", "start", "share", "GiB", "weights", "load", "peak", "activ.", "KV", "GiB",
                                "KV", "tokens", "needed", "headroom"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line and not line.startswith(("rtx5090", "lambda"))
            and not line.startswith("backend")}
    assert rows["general"][:9] == ["general", "always", "0.39", "12.4", "7.0", "7.0", "1.0", "4.4", "72,122"]
    assert rows["general"][9:] == ["65,536", "+0.4", "GiB"]
    assert rows["code"][1:3] == ["on", "demand"] and rows["general70"][4] == "18.5"  # per GPU, tensor parallel 2
    assert any(line.startswith("rtx5090: 31.8 GiB, 30.2 after 5% headroom; always-on 20.8 GiB, worst case with the "
                               "largest on-demand backend 30.0 GiB") for line in lines)


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


TWO_HOSTS = """  rtx5090-b:
    description: a second RTX 5090 box
    gpu_memory_gb: 31.8
    gpu_count: 1
    headroom: 0.05
    process_overhead_gib: 1.0
"""
GENERAL_ONE_SERVER = """    url: http://127.0.0.1:8000
    url_env: DREAMSEED_GENERAL_URL
    model: mistralai/Mistral-7B-Instruct-v0.3"""
GENERAL_TWO_REPLICAS = """    replicas:
      - {url: http://127.0.0.1:8000, url_env: DREAMSEED_GENERAL_URL, host: rtx5090}
      - {url: http://10.0.0.2:8000, host: rtx5090-b}
    balance: prefix_affinity
    model: mistralai/Mistral-7B-Instruct-v0.3"""


def two_replica_policies(policies: Path) -> Path:
    edit(policies, "backends.yaml", "  lambda-2xa100:\n", TWO_HOSTS + "  lambda-2xa100:\n")
    edit(policies, "backends.yaml", GENERAL_ONE_SERVER, GENERAL_TWO_REPLICAS)
    edit(policies, "backends.yaml", "    host: rtx5090\n    gpu_memory_utilization: 0.39", "    gpu_memory_utilization: 0.39")
    return policies


def test_a_backend_of_two_replicas_on_two_hosts_is_planned_on_each(policies: Path) -> None:
    result = check(two_replica_policies(policies))
    assert result.returncode == 0, result.stderr
    catalog = load_policies(policies).catalog
    assert [r.host for r in catalog.backends["general"].replica_list()] == ["rtx5090", "rtx5090-b"]
    assert "general#1" in memory_plan(catalog, "rtx5090").backends
    assert list(memory_plan(catalog, "rtx5090-b").backends) == ["general#2"]
    plan = subprocess.run([sys.executable, "-m", "dreamseed.cli", "policies", "plan", str(policies)],
                          capture_output=True, text=True)
    assert plan.returncode == 0 and "general#2" in plan.stdout and "rtx5090-b:" in plan.stdout, plan.stdout


@pytest.mark.parametrize(
    ("old", "new", "needle", "expected"),
    [
        # url beside replicas
        ("    balance: prefix_affinity", "    balance: prefix_affinity\n    url: http://127.0.0.1:9", "url: http://127.0.0.1:9",
         "backends.general.url: give `url` per replica under `replicas`, not for the backend"),
        # the same server twice
        ("http://10.0.0.2:8000", "http://127.0.0.1:8000", "- {url: http://127.0.0.1:8000, host: rtx5090-b}",
         "backends.general.replicas[1].url: the same URL as replica 0"),
        # a replica on an unknown host
        ("host: rtx5090-b}", "host: rtx5090-c}", "rtx5090-c",
         "backends.general.replicas[1].host: unknown host 'rtx5090-c'"),
        # a replica with no host where the backend has a GPU share
        ("{url: http://10.0.0.2:8000, host: rtx5090-b}", "{url: http://10.0.0.2:8000}", "- {url: http://10.0.0.2:8000}",
         "backends.general.replicas[1]: with `gpu_memory_utilization`, every replica needs a `host`"),
        # an unknown balance
        ("balance: prefix_affinity", "balance: random", "balance: random",
         "backends.general.balance: Invalid enum value 'random'"),
    ],
)
def test_replica_mistakes_name_file_line_and_field(policies: Path, old: str, new: str, needle: str,
                                                   expected: str) -> None:
    edit(two_replica_policies(policies), "backends.yaml", old, new)
    result = check(policies)
    assert result.returncode == 1
    line = line_of(policies, "backends.yaml", needle)
    assert f"{policies / 'backends.yaml'}:{line}: {expected}" in result.stderr, result.stderr


def test_a_second_replica_on_a_full_host_is_refused(policies: Path) -> None:
    two_replica_policies(policies)
    edit(policies, "backends.yaml", "host: rtx5090-b}", "host: rtx5090}")  # both on the one card
    result = check(policies)
    assert result.returncode == 1
    assert "always-on backends need" in result.stderr, result.stderr


def test_an_on_demand_backend_of_replicas_needs_an_actuator_that_starts_them_all(policies: Path) -> None:
    edit(policies, "backends.yaml", """    url: http://127.0.0.1:8001
    url_env: DREAMSEED_CODE_URL""", """    replicas:
      - {url: http://127.0.0.1:8001, url_env: DREAMSEED_CODE_URL, host: rtx5090}
      - {url: http://10.0.0.2:8001, host: rtx5090}""")
    edit(policies, "backends.yaml", "    host: rtx5090\n    gpu_memory_utilization: 0.26", "    gpu_memory_utilization: 0.26")
    result = check(policies)
    assert result.returncode == 1
    assert "backends.code.actuator: backend 'code' has 2 replicas, which start and stop together, but a docker" \
        in result.stderr, result.stderr
