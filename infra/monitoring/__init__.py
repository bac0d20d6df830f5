"""Monitoring configuration generated from the backend catalog: Prometheus scrape config, SLO
recording and alert rules, and the Grafana datasource and dashboard.

    python -m infra.monitoring OUT_DIR [--policies DIR] [--gpu-host rtx5090]

writes prometheus.yml, rules.yml, grafana/datasource.yaml, grafana/dashboards.yaml and
grafana/dreamseed.json (the `local` stack uploads the same content into its containers).

SLOs (the seed's targets): errors (5xx) under 1% of requests; P95 time to first token under
each backend's `latency_target` (0.1 s for the 7B class, 0.5 s for the 70B), i.e. at most 5% of
requests slower. Alerts are multi-window burn rates as in Google's SRE workbook: page when
(5m and 1h > 14.4x budget) or (30m and 6h > 6x); ticket when (2h and 1d > 3x) or (6h and 3d > 1x).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import yaml

from dreamseed.policy import Policies

WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
ERROR_BUDGET = 0.01
LATENCY_BUDGET = 0.05
# (severity, [(short window, long window, burn rate factor), ...]) - each pair must both burn.
BURN_ALERTS = (
    ("page", "Fast", (("5m", "1h", 14.4), ("30m", "6h", 6.0))),
    ("ticket", "Slow", (("2h", "1d", 3.0), ("6h", "3d", 1.0))),
)


def local_backends(policies: Policies, gpu_host: str) -> dict[str, Any]:
    from infra.components.common import backends_on

    return backends_on(policies, gpu_host)


def remote_backends(policies: Policies, gpu_host: str) -> list[str]:
    return [name for name, b in policies.catalog.backends.items() if b.host is not None and b.host != gpu_host]


def _regex(names: list[str]) -> str:
    return "|".join(sorted(names))


# --- Prometheus ---------------------------------------------------------------------------


def prometheus_config(proxy_target: str, vllm_targets: dict[str, tuple[str, bool]],
                      rule_files: tuple[str, ...] = ("rules.yml",), scrape_interval: str = "15s", *,
                      remote_vllm_targets: dict[str, str] | None = None, gpu_exporter: str | None = None,
                      embeddings: str | None = None, alertmanager: str | None = None) -> str:
    """Scrape the proxy and every local vLLM server, each labelled with its backend name (and a
    replica's with `replica`, its label in the proxy: general#2) and whether it is on demand (a
    stopped on-demand server is not an outage); the remote 70B through its tunnel (its own job: a
    terminated rented host is not a page); the GPU exporter and the embedding server when there are
    ones; and send alerts to Alertmanager."""
    scrape_configs: list[dict[str, Any]] = [
        {"job_name": "dreamseed-proxy", "static_configs": [{"targets": [proxy_target]}]},
        {"job_name": "vllm", "static_configs": [
            {"targets": [target], "labels": {"backend": name.split("#")[0], "on_demand": str(on_demand).lower(),
                                             **({"replica": name} if "#" in name else {})}}
            for name, (target, on_demand) in sorted(vllm_targets.items())
        ]},
    ]
    if remote_vllm_targets:
        scrape_configs.append({"job_name": "vllm-remote", "static_configs": [
            {"targets": [target], "labels": {"backend": name, "on_demand": "false"}}
            for name, target in sorted(remote_vllm_targets.items())]})
    if gpu_exporter:
        scrape_configs.append({"job_name": "gpu", "static_configs": [{"targets": [gpu_exporter]}]})
    if embeddings:
        scrape_configs.append({"job_name": "embeddings", "static_configs": [{"targets": [embeddings]}]})
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": list(rule_files),
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    config["scrape_configs"] = scrape_configs
    return yaml.safe_dump(config, sort_keys=False)


def alertmanager_config(webhook_url: str | None, group_wait: str = "30s") -> str:
    """One receiver, the team's webhook (Slack, a pager, a chat bridge: anything that takes
    Alertmanager's webhook JSON). Pages repeat hourly while they fire, tickets twice a day; both
    say when they are resolved. Without a URL, alerts only show in Alertmanager and Grafana."""
    receiver: dict[str, Any] = {"name": "team"}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    return yaml.safe_dump({
        "route": {
            "receiver": "team", "group_by": ["alertname", "backend"], "group_wait": group_wait,
            "group_interval": "5m", "repeat_interval": "12h",
            "routes": [{"matchers": ['severity="page"'], "receiver": "team", "repeat_interval": "1h"}],
        },
        # A page for a backend silences the ticket about the same backend.
        "inhibit_rules": [{"source_matchers": ['severity="page"'], "target_matchers": ['severity="ticket"'],
                           "equal": ["backend"]}],
        "receivers": [receiver],
    }, sort_keys=False)


def _slow_ratio(window: str, groups: dict[float, list[str]]) -> str:
    """Share of requests slower than their backend's latency target, per backend."""
    parts = []
    for target, names in sorted(groups.items()):
        selector = f'backend=~"{_regex(names)}"'
        parts.append(
            f'(1 - sum by (backend) (rate(dreamseed_time_to_first_token_seconds_bucket{{le="{target:g}",{selector}}}[{window}]))'
            f' / sum by (backend) (rate(dreamseed_time_to_first_token_seconds_count{{{selector}}}[{window}])))'
        )
    return " or ".join(parts)


def alert_rules(policies: Policies, gpu_host: str) -> str:
    backends = policies.catalog.backends
    targets: dict[float, list[str]] = defaultdict(list)
    for name, backend in backends.items():
        targets[backend.latency_target].append(name)
    recording = []
    for window in WINDOWS:
        recording.append({
            "record": f"dreamseed:request_error_ratio:rate{window}",
            "expr": f'sum(rate(dreamseed_requests_total{{status=~"5.."}}[{window}]))'
                    f' / sum(rate(dreamseed_requests_total[{window}]))',
        })
        recording.append({"record": f"dreamseed:ttft_slow_ratio:rate{window}", "expr": _slow_ratio(window, targets)})

    alerts: list[dict[str, Any]] = []
    for severity, speed, pairs in BURN_ALERTS:
        for slo, series, budget, what in (
            ("error", "dreamseed:request_error_ratio", ERROR_BUDGET, "5xx errors"),
            ("latency", "dreamseed:ttft_slow_ratio", LATENCY_BUDGET, "requests slower than the latency target"),
        ):
            expr = " or ".join(
                f"({series}:rate{short} > {factor * budget:g} and {series}:rate{long} > {factor * budget:g})"
                for short, long, factor in pairs
            )
            alerts.append({
                "alert": f"DreamSeed{slo.capitalize()}BudgetBurn{speed}",
                "expr": expr,
                "labels": {"severity": severity, "slo": slo},
                "annotations": {"summary": f"{what} are burning the {budget:.0%} error budget "
                                           f"{'fast' if speed == 'Fast' else 'steadily'}"
                                           + (" on backend {{ $labels.backend }}" if slo == "latency" else "")},
            })
    remote = remote_backends(policies, gpu_host)
    local = [n for n in backends if n not in remote]
    alerts.append({
        "alert": "DreamSeedBackendDown",
        "expr": f'dreamseed_backend_up{{on_demand="false",backend=~"{_regex(local)}"}} == 0',
        "for": "2m", "labels": {"severity": "page"},
        "annotations": {"summary": "backend {{ $labels.backend }} fails its health checks"},
    })
    if remote:
        alerts.append({
            "alert": "DreamSeedRemoteBackendUnreachable",
            "expr": f'dreamseed_backend_up{{backend=~"{_regex(remote)}"}} == 0',
            "for": "5m", "labels": {"severity": "ticket"},
            "annotations": {"summary": "remote backend {{ $labels.backend }} is unreachable; long prompts use the "
                                       "fallback"},
        })
    alerts += [
        {"alert": "DreamSeedVllmDown", "expr": 'up{job="vllm",on_demand="false"} == 0', "for": "2m",
         "labels": {"severity": "page"}, "annotations": {"summary": "vLLM server {{ $labels.backend }} is not scraped"}},
        {"alert": "DreamSeedProxyDown", "expr": 'up{job="dreamseed-proxy"} == 0', "for": "1m",
         "labels": {"severity": "page"}, "annotations": {"summary": "the DreamSeed proxy is not scraped"}},
        {"alert": "DreamSeedOnDemandStartFailed",
         "expr": 'sum by (backend) (increase(dreamseed_scaler_events_total{event="start_failed"}[15m])) > 0',
         "labels": {"severity": "ticket"},
         "annotations": {"summary": "on-demand backend {{ $labels.backend }} failed to start; its requests use the "
                                    "fallback (GET /admin/backends shows the error)"}},
        {"alert": "DreamSeedOnDemandStartRefused",
         "expr": 'sum by (backend) (increase(dreamseed_scaler_events_total{event="refused"}[15m])) > 0',
         "labels": {"severity": "ticket"},
         "annotations": {"summary": "on-demand backend {{ $labels.backend }} could not start within the GPU memory "
                                    "budget"}},
        {"alert": "DreamSeedGpuHot", "expr": "max by (gpu) (DCGM_FI_DEV_GPU_TEMP) > 85", "for": "10m",
         "labels": {"severity": "ticket"},
         "annotations": {"summary": "GPU {{ $labels.gpu }} has run above 85 C for 10 minutes; it will throttle"}},
        {"alert": "DreamSeedGpuExporterDown", "expr": 'up{job="gpu"} == 0', "for": "5m",
         "labels": {"severity": "ticket"}, "annotations": {"summary": "the GPU exporter is not scraped"}},
        {"alert": "DreamSeedPolicyReloadFailed",
         "expr": 'increase(dreamseed_policy_reloads_total{result="failure"}[15m]) > 0',
         "labels": {"severity": "ticket"},
         "annotations": {"summary": "a policy edit was refused; the previous policy is still in force "
                                    "(GET /admin/policies shows why)"}},
    ]
    return yaml.safe_dump({"groups": [{"name": "dreamseed-slo-recording", "rules": recording},
                                      {"name": "dreamseed-alerts", "rules": alerts}]}, sort_keys=False, width=1000)


# --- Grafana ------------------------------------------------------------------------------


def grafana_datasource(prometheus_url: str) -> str:
    return yaml.safe_dump({
        "apiVersion": 1,
        "datasources": [{"name": "Prometheus", "type": "prometheus", "access": "proxy", "url": prometheus_url,
                         "isDefault": True, "uid": "prometheus"}],
    }, sort_keys=False)


def grafana_dashboard_provider(path: str) -> str:
    return yaml.safe_dump({"apiVersion": 1, "providers": [
        {"name": "dreamseed", "type": "file", "options": {"path": path}}]}, sort_keys=False)


RATE = "$__rate_interval"

# (title, unit, [(expr, legend)]) in dashboard order; every query is checked by promtool in the tests.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Request rate by backend", "reqps",
     ((f"sum by (backend) (rate(dreamseed_requests_total[{RATE}]))", "{{backend}}"),)),
    ("Error ratio (5xx)", "percentunit",
     ((f'sum(rate(dreamseed_requests_total{{status=~"5.."}}[{RATE}])) / sum(rate(dreamseed_requests_total[{RATE}]))',
       "errors"),)),
    ("Request duration P50 / P95 / P99", "s", tuple(
        (f"histogram_quantile({q}, sum by (le, backend) (rate(dreamseed_request_duration_seconds_bucket[{RATE}])))",
         f"P{int(q * 100)} {{{{backend}}}}") for q in (0.5, 0.95, 0.99))),
    ("Time to first token P95", "s",
     ((f"histogram_quantile(0.95, sum by (le, backend) (rate(dreamseed_time_to_first_token_seconds_bucket[{RATE}])))",
       "{{backend}}"),)),
    ("In flight and queued", "short",
     (("sum by (backend) (dreamseed_in_flight_requests)", "in flight {{backend}}"),
      ("sum by (backend) (dreamseed_queued_requests)", "queued {{backend}}"))),
    ("Backend up (health checks)", "short",
     (("max by (backend) (dreamseed_backend_up)", "{{backend}}"),)),
    ("Open circuits", "short",
     (('max by (backend, state) (dreamseed_backend_circuit_state{state!="closed"})', "{{backend}} {{state}}"),)),
    ("Fallbacks by reason", "reqps",
     ((f"sum by (backend, reason) (rate(dreamseed_fallbacks_total[{RATE}]))", "{{backend}} {{reason}}"),)),
    ("Tokens per second", "short",
     ((f"sum by (backend) (rate(dreamseed_completion_tokens_total[{RATE}]))", "completion {{backend}}"),
      (f"sum by (backend) (rate(dreamseed_prompt_tokens_total[{RATE}]))", "prompt {{backend}}"))),
    # vLLM's series, or llama.cpp's where a backend runs llama-server (`serve --local-model`, tests).
    ("Inference engine load", "short",
     (("sum by (backend) (vllm:num_requests_running) or sum by (backend) (llamacpp:requests_processing)",
       "running {{backend}}"),
      ("sum by (backend) (vllm:num_requests_waiting) or sum by (backend) (llamacpp:requests_deferred)",
       "waiting {{backend}}"))),
    # NVIDIA's dcgm-exporter on the GPU host (its default counters).
    ("GPU memory used", "decmbytes",
     (("max by (gpu) (DCGM_FI_DEV_FB_USED)", "used GPU {{gpu}}"),
      ("max by (gpu) (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)", "total GPU {{gpu}}"))),
    ("GPU utilisation", "percent",
     (("max by (gpu) (DCGM_FI_DEV_GPU_UTIL)", "GPU {{gpu}}"),)),
    ("GPU temperature and power", "celsius",
     (("max by (gpu) (DCGM_FI_DEV_GPU_TEMP)", "temperature GPU {{gpu}}"),
      ("max by (gpu) (DCGM_FI_DEV_POWER_USAGE)", "power (W) GPU {{gpu}}"))),
    ("vLLM KV cache usage", "percentunit",
     (("max by (backend) (vllm:kv_cache_usage_perc)", "{{backend}}"),)),
    ("RAG retrieval P50 / P95", "s", tuple(
        (f"histogram_quantile({q}, sum by (le) (rate(dreamseed_rag_retrieval_seconds_bucket[{RATE}])))",
         f"P{int(q * 100)}") for q in (0.5, 0.95))),
    ("RAG hit rate and degraded share", "percentunit",
     ((f'sum(rate(dreamseed_rag_requests_total{{outcome="hits"}}[{RATE}])) / sum(rate(dreamseed_rag_requests_total[{RATE}]))',
       "with context"),
      (f'sum(rate(dreamseed_rag_requests_total{{outcome="degraded"}}[{RATE}])) / sum(rate(dreamseed_rag_requests_total[{RATE}]))',
       "degraded"))),
    ("On-demand backends (scaler state)", "short",
     (('max by (backend, state) (dreamseed_scaler_state) > 0', "{{backend}} {{state}}"),)),
    ("Scaler events", "short",
     (("sum by (backend, event, reason) (increase(dreamseed_scaler_events_total[1h]))",
       "{{backend}} {{event}} ({{reason}})"),)),
    ("Policy reloads", "short",
     (("sum by (result) (increase(dreamseed_policy_reloads_total[1h]))", "{{result}}"),)),
)


def dashboard_json() -> str:
    # The SDK type-checks the model; imported here so the proxy never needs it.
    from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
    from grafana_foundation_sdk.builders.prometheus import Dataquery
    from grafana_foundation_sdk.builders.timeseries import Panel
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid="prometheus")
    builder = (
        Dashboard("DreamSeed").uid("dreamseed").tags(["dreamseed", "generated"]).refresh("30s")
        .time("now-3h", "now").with_row(Row("Proxy"))
    )
    for title, unit, queries in PANELS:
        panel = Panel().title(title).unit(unit).datasource(source).height(8).span(12)
        for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
            panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(source))
        builder = builder.with_panel(panel)
    return JSONEncoder(sort_keys=True, indent=2).encode(builder.build())


def write_all(directory: Any, policies: Policies, gpu_host: str, proxy_target: str = "dreamseed-proxy:8080") -> None:
    from pathlib import Path

    from infra.components.common import backend_port, container_name

    out = Path(directory)
    (out / "grafana").mkdir(parents=True, exist_ok=True)
    targets = {name: (f"{container_name(name)}:{backend_port(b)}", b.on_demand)
               for name, b in local_backends(policies, gpu_host).items()}
    remote = {name: f"dreamseed-tunnel-{name}:8000" for name in remote_backends(policies, gpu_host)}
    (out / "prometheus.yml").write_text(prometheus_config(
        proxy_target, targets, remote_vllm_targets=remote, gpu_exporter="dreamseed-gpu-exporter:9400",
        alertmanager="dreamseed-alertmanager:9093"), encoding="utf-8")
    (out / "alertmanager.yml").write_text(alertmanager_config("http://team-webhook.example/alerts"), encoding="utf-8")
    (out / "rules.yml").write_text(alert_rules(policies, gpu_host), encoding="utf-8")
    (out / "grafana" / "datasource.yaml").write_text(grafana_datasource("http://dreamseed-prometheus:9090"))
    (out / "grafana" / "dashboards.yaml").write_text(grafana_dashboard_provider("/var/lib/grafana/dashboards"))
    (out / "grafana" / "dreamseed.json").write_text(dashboard_json(), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    from dreamseed.policy import load_policies

    parser = argparse.ArgumentParser(prog="python -m infra.monitoring", description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--policies", default=str(Path(__file__).resolve().parents[2] / "policies"))
    parser.add_argument("--gpu-host", default="rtx5090")
    args = parser.parse_args(argv)
    write_all(args.out, load_policies(args.policies), args.gpu_host)
    print(f"monitoring configuration written to {args.out}")
