"""API keys: client and admin kinds, 401 vs 403, constant-time digests, nothing leaked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dreamseed.auth import KeyRing
from dreamseed.errors import ProxyError
from support import Process, Sim, free_port, start_proxy, start_sim, write_policies

CLIENT_KEYS = ("client-key-one", "client-key-two")
ADMIN_KEY = "admin-key-secret"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Sim]]:
    sim = start_sim("m")
    directory = tmp_path_factory.mktemp("auth")
    admin_file = directory / "admin.key"
    admin_file.write_text(f"# the admin key\n{ADMIN_KEY}\n")
    policies = write_policies(directory / "p", {"general": {"url": sim.url, "model": "m", "context_length": 1024}},
                              {"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, env={"DREAMSEED_API_KEYS": ", ".join(CLIENT_KEYS),
                                       "DREAMSEED_ADMIN_KEY_FILE": str(admin_file)}, extra=["--metrics-port", "0"])
    yield proxy, sim
    proxy.stop()
    sim.stop()


def call(proxy: Process, path: str, key: str | None, method: str = "POST") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.request(method, f"{proxy.url}{path}", json=body if method == "POST" else None, headers=headers)


def test_client_endpoints_need_a_client_key(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, sim = secured
    missing = call(proxy, "/v1/chat/completions", None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = call(proxy, "/v1/chat/completions", "not-a-key")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert sim.stats()["requests"] == 0
    for key in CLIENT_KEYS:
        assert call(proxy, "/v1/chat/completions", key).status_code == 200
    assert call(proxy, "/v1/models", CLIENT_KEYS[0], "GET").status_code == 200
    assert call(proxy, "/v1/models", None, "GET").status_code == 401
    admin_as_client = call(proxy, "/v1/chat/completions", ADMIN_KEY)
    assert admin_as_client.status_code == 403 and admin_as_client.json()["error"]["code"] == "wrong_key_kind"


def test_admin_endpoints_need_the_admin_key(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, _ = secured
    assert call(proxy, "/admin/policies", None, "GET").status_code == 401
    client_as_admin = call(proxy, "/admin/policies", CLIENT_KEYS[0], "GET")
    assert client_as_admin.status_code == 403 and client_as_admin.json()["error"]["code"] == "wrong_key_kind"
    ok = call(proxy, "/admin/policies", ADMIN_KEY, "GET")
    assert ok.status_code == 200 and len(ok.json()["policy_hash"]) == 64
    assert call(proxy, "/admin/backends", ADMIN_KEY, "GET").json()["backends"]["general"]["state"] in ("up", "unknown")


def test_probes_and_health_stay_open(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, _ = secured
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200
    ready = httpx.get(f"{proxy.url}/readyz")
    # Any prober gets the answer; the backends behind it only with a key.
    assert ready.status_code in (200, 503) and ready.json() == {"ready": ready.status_code == 200}
    detailed = httpx.get(f"{proxy.url}/readyz", headers={"authorization": f"Bearer {CLIENT_KEYS[0]}"})
    assert detailed.json()["backends"]["general"]["state"] in ("up", "unknown")


def internal_url(proxy: Process) -> str:
    (line,) = [line for line in proxy.lines if line.startswith("metrics and probes on ")]
    return line.split()[4]


def test_metrics_and_the_api_document_need_a_key_on_the_public_listener(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, _ = secured
    assert call(proxy, "/metrics", None, "GET").status_code == 401
    as_client = call(proxy, "/metrics", CLIENT_KEYS[0], "GET")  # traffic and backends are the operator's business
    assert as_client.status_code == 403 and as_client.json()["error"]["code"] == "wrong_key_kind"
    scraped = call(proxy, "/metrics", ADMIN_KEY, "GET")
    assert scraped.status_code == 200 and "dreamseed_requests_total" in scraped.text
    assert call(proxy, "/openapi.json", None, "GET").status_code == 401
    document = call(proxy, "/openapi.json", CLIENT_KEYS[1], "GET")
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.")


def test_the_internal_listener_serves_prometheus_and_the_probes_only(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, sim = secured
    internal = internal_url(proxy)
    assert internal.startswith("http://127.0.0.1:") and internal != proxy.url
    scraped = httpx.get(f"{internal}/metrics")
    assert scraped.status_code == 200 and "dreamseed_policy_info" in scraped.text
    assert httpx.get(f"{internal}/healthz").status_code == 200
    assert httpx.get(f"{internal}/readyz").json()["backends"]["general"]["state"] in ("up", "unknown")
    before = sim.stats()["requests"]
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/openapi.json"),
                         ("GET", "/admin/policies")):
        refused = httpx.request(method, f"{internal}{path}", json={"model": "auto", "messages": []}
                                if method == "POST" else None, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found", path
    assert sim.stats()["requests"] == before


def test_the_metrics_port_must_differ_from_the_main_one(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "p", {"general": {"url": "http://127.0.0.1:1", "model": "m", "context_length": 1}},
                              {"rules": [{"name": "default", "target": "general"}]})
    port = str(free_port())
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--port", port,
                             "--metrics-port", port, "--workers", "1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--metrics-port must differ from --port" in result.stderr


def test_keys_never_appear_in_responses_or_logs(secured) -> None:  # type: ignore[no-untyped-def]
    proxy, _ = secured
    responses = [call(proxy, "/v1/chat/completions", "leaky-guess-123"), call(proxy, "/admin/policies", CLIENT_KEYS[1], "GET")]
    text = "".join(r.text + str(r.headers) for r in responses) + proxy.log()
    for secret in (*CLIENT_KEYS, ADMIN_KEY, "leaky-guess-123"):
        assert secret not in text


def test_admin_api_is_disabled_without_an_admin_key() -> None:
    keys = KeyRing.from_environment({"DREAMSEED_API_KEYS": "a"})
    with pytest.raises(ProxyError) as disabled:
        keys.check(b"Bearer a", "admin")
    assert disabled.value.status == 403 and disabled.value.code == "admin_disabled"
    open_keys = KeyRing.from_environment({})
    open_keys.check(None, "client")  # no client keys configured: the endpoints are open


def test_key_files_and_lists_are_parsed(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("k-file-1  # team a\n\n# retired: old-key\nk-file-2\n")
    keys = KeyRing.from_environment({"DREAMSEED_API_KEYS": "k-env-1,k-env-2 k-env-3", "DREAMSEED_API_KEYS_FILE": str(keys_file)})
    assert len(keys.client) == 5
    for key in ("k-env-1", "k-env-3", "k-file-1", "k-file-2"):
        keys.check(f"Bearer {key}".encode(), "client")
    with pytest.raises(ProxyError):
        keys.check(b"Bearer old-key", "client")
    with pytest.raises(ProxyError):
        keys.check(b"Basic k-env-1", "client")


def test_refuses_to_serve_beyond_loopback_without_keys(tmp_path: Path) -> None:
    policies = write_policies(tmp_path / "p", {"general": {"url": "http://127.0.0.1:1", "model": "m", "context_length": 1}},
                              {"rules": [{"name": "default", "target": "general"}]})
    result = subprocess.run([sys.executable, "-m", "dreamseed.cli", "serve", "--policies", str(policies), "--host", "0.0.0.0",
                             "--port", "0"], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without client API keys" in result.stderr
