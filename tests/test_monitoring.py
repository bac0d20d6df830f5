"""Monitoring configuration checked with the real Prometheus tools (Debian's prometheus package:
.ci/run installs it), against the real proxy's /metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import Stack
from dreamseed.policy import load_policies
from infra.monitoring import PANELS, RATE, alert_rules, write_all
from support import SEED_POLICIES, start_prometheus

ROOT = Path(__file__).resolve().parent.parent
SEED = load_policies(SEED_POLICIES)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing: .ci/run installs Debian's prometheus package"
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monitoring")
    write_all(out, SEED, "rtx5090")
    shutil.copy(ROOT / "infra" / "monitoring" / "rules.test.yml", out)
    return out


def test_config_and_rules_pass_promtool(generated: Path) -> None:
    checked = promtool("check", "config", "prometheus.yml", cwd=generated)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", "rules.yml", cwd=generated)
    assert rules.returncode == 0 and "SUCCESS: 27 rules found" in rules.stdout, rules.stdout + rules.stderr


def test_alert_unit_tests_fire_and_stay_silent(generated: Path) -> None:
    result = promtool("test", "rules", "rules.test.yml", cwd=generated)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_dashboard_query_parses(generated: Path) -> None:
    # Grafana's $__rate_interval is not PromQL: give it a value, then let promtool parse each query.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr.replace(RATE, "5m")}
        for i, (_, _, queries) in enumerate(PANELS) for expr, _ in queries]}]}
    (generated / "dashboard_queries.yml").write_text(yaml.safe_dump(rules, width=1000))
    result = promtool("check", "rules", "dashboard_queries.yml", cwd=generated)
    assert result.returncode == 0, result.stdout + result.stderr
    dashboard = (generated / "grafana" / "dreamseed.json").read_text()
    assert all(expr.replace('"', '\\"') in dashboard for _, _, queries in PANELS for expr, _ in queries)


def exported_names(*scrapes: str) -> set[str]:
    """Sample names a /metrics text really exports (histograms as _bucket, _count, _sum)."""
    names: set[str] = {"up"}
    for text in scrapes:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else {name}
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def used_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:dreamseed_[a-z_]+|vllm:[a-z_]+|up)(?=\s*[{\[)])", expr))


def test_every_metric_in_the_dashboard_and_rules_is_really_exported(fresh: Stack) -> None:
    httpx.post(f"{fresh.url}/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    proxy_metrics = httpx.get(f"{fresh.url}/metrics").text
    vllm_metrics = httpx.get(f"{fresh.sims['general'].url}/metrics").text
    exported = exported_names(proxy_metrics, vllm_metrics)
    rules = yaml.safe_load(alert_rules(SEED, "rtx5090"))
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    expressions += [expr for _, _, queries in PANELS for expr, _ in queries]
    used: set[str] = set()
    for expr in expressions:
        used |= used_names(expr)
        for name in re.findall(r"\bdreamseed:[a-z_]+:[a-z0-9]+", expr):
            assert name in recorded, f"{name} is used but no rule records it"
    assert used, "no metric names found: the pattern is wrong"
    missing = sorted(used - exported)
    assert not missing, f"used but not exported by the proxy or vLLM: {missing}"
    assert {"dreamseed_requests_total", "dreamseed_time_to_first_token_seconds_bucket", "vllm:num_requests_running",
            "dreamseed_backend_up", "up"} <= used


def test_a_real_prometheus_scrapes_the_proxy_and_answers_the_request_rate_query(fresh: Stack, tmp_path: Path) -> None:
    server, api = start_prometheus(tmp_path, fresh.url, {"general": fresh.sims["general"].url},
                                   alert_rules(SEED, "rtx5090"))
    request_rate = next(q for title, _, qs in PANELS if title == "Request rate by backend" for q, _ in qs)
    query = request_rate.replace(RATE, "1m")
    try:
        deadline = time.monotonic() + 45
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            httpx.post(f"{fresh.url}/v1/chat/completions",
                       json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})
            try:
                answer = httpx.get(f"{api}/query", params={"query": query}).json()
                result = answer["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                result = []
            if result and any(float(r["value"][1]) > 0 for r in result):  # type: ignore[index]
                break
            time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
        assert {r["metric"]["backend"] for r in result} >= {"general"}  # type: ignore[index]
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert {t["labels"]["job"]: t["health"] for t in targets} == {"dreamseed-proxy": "up", "vllm": "up"}
        rules = httpx.get(f"{api}/rules").json()["data"]["groups"]
        assert {g["name"] for g in rules} == {"dreamseed-slo-recording", "dreamseed-alerts"}
    finally:
        server.terminate()
        server.wait(timeout=10)


# dcgm-exporter's default counters (etc/default-counters.csv of NVIDIA/dcgm-exporter 4.8.2), the ones
# the GPU panels and rules may use without a custom counters file.
DCGM_DEFAULT_COUNTERS = {
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED",
}


def test_the_gpu_panels_and_rules_use_the_exporters_default_counters() -> None:
    rules = yaml.safe_load(alert_rules(SEED, "rtx5090"))
    expressions = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    expressions += [expr for _, _, queries in PANELS for expr, _ in queries]
    used = {name for expr in expressions for name in re.findall(r"\bDCGM_FI_[A-Z_]+", expr)}
    assert {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP"} <= used  # memory, load, heat
    assert used <= DCGM_DEFAULT_COUNTERS


def test_alertmanager_config_passes_amtool(generated: Path) -> None:
    assert shutil.which("amtool"), "amtool is missing: .ci/run installs Debian's prometheus-alertmanager package"
    checked = subprocess.run(["amtool", "check-config", "alertmanager.yml"], cwd=generated, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    assert " - 1 receivers" in checked.stdout and " - 1 inhibit rules" in checked.stdout


def test_a_firing_alert_reaches_the_teams_webhook_through_a_real_alertmanager(fresh: Stack, tmp_path: Path) -> None:
    """Prometheus (its alerting section as generated) -> Alertmanager (its config as generated) ->
    the webhook: the path a page takes in a real deployment."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from infra.monitoring import alertmanager_config, prometheus_config
    from support import free_port

    received: list[dict[str, object]] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    manager_bin = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert manager_bin, "Alertmanager is missing: .ci/run installs Debian's prometheus-alertmanager package"
    am_port, prom_port = free_port(), free_port()
    (tmp_path / "alertmanager.yml").write_text(
        alertmanager_config(f"http://127.0.0.1:{hook.server_address[1]}/alerts", group_wait="1s"))
    # The generated rules, plus one that fires at once (the generated ones wait minutes, rightly).
    (tmp_path / "rules.yml").write_text(alert_rules(SEED, "rtx5090"))
    (tmp_path / "now.yml").write_text(yaml.safe_dump({"groups": [{"name": "delivery", "rules": [
        {"alert": "DreamSeedDeliveryCheck", "expr": "vector(1)", "labels": {"severity": "page", "backend": "general"},
         "annotations": {"summary": "a page on its way"}}]}]}))
    (tmp_path / "prometheus.yml").write_text(prometheus_config(
        fresh.url.removeprefix("http://"), {}, rule_files=("rules.yml", "now.yml"), scrape_interval="1s",
        alertmanager=f"127.0.0.1:{am_port}"))
    manager = subprocess.Popen([manager_bin, f"--config.file={tmp_path / 'alertmanager.yml'}",
                                f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
                                "--cluster.listen-address="],
                               stdout=subprocess.DEVNULL, stderr=(tmp_path / "alertmanager.log").open("w"))
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}",
                                   # An alert that fires before Alertmanager is discovered is dropped
                                   # and resent only after this delay (1 minute by default).
                                   "--rules.alert.resend-delay=1s"],
                                  stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        deadline = time.monotonic() + 60
        while not received and time.monotonic() < deadline:
            time.sleep(0.25)
        assert received, (tmp_path / "alertmanager.log").read_text()[-2000:] + (tmp_path / "prometheus.log").read_text()[-2000:]
        message = received[0]
        assert message["receiver"] == "team" and message["status"] == "firing"
        (alert,) = message["alerts"]  # type: ignore[misc]
        assert alert["labels"]["alertname"] == "DreamSeedDeliveryCheck" and alert["labels"]["severity"] == "page"
        assert alert["annotations"]["summary"] == "a page on its way"
    finally:
        for process in (prometheus, manager):
            process.terminate()
            process.wait(timeout=10)
        hook.shutdown()
