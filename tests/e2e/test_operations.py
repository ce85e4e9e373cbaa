"""Operating the real process: reload, auth on every surface, TLS, a full disk, listen rules."""

from __future__ import annotations

import base64
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ExporterProcess, free_port, metric_value, wait_until
from fixtures.fake_provider import FakeProvider
from helpers.binaries import find_binary

TOKEN = "ingest-token-0123456789abcdef"
EVENT = {"department": "engineering", "project": "ai-features", "provider": "openai",
         "model": "gpt-4o", "tokens": {"input": 1_000_000}}  # 1M × $2.50/M = $2.50


def _budget_limit(exporter: ExporterProcess, period: str = "daily") -> float | None:
    return metric_value(exporter.metrics(), "llm_budget_limit_usd", department="engineering",
                        project="ai-features", period=period)


def test_reload_by_sighup_and_http_keeps_old_config_when_new_is_bad(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory({"budgets": [
        {"department": "engineering", "project": "ai-features", "daily_usd": 10}]})
    config = yaml.safe_load(exporter.config_path.read_text())
    assert _budget_limit(exporter) == 10
    # Raise the budget and add a negotiated price for gpt-4o, then SIGHUP.
    prices = exporter.config_path.parent / "prices.yaml"
    prices.write_text("models: [{model: gpt-4o, input: 2.0, output: 8.0}]\n")
    config["budgets"][0]["daily_usd"] = 20
    config["pricing"] = {"overrides": str(prices)}
    exporter.config_path.write_text(yaml.safe_dump(config))
    assert exporter.proc is not None
    exporter.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _budget_limit(exporter) == 20, 10, "SIGHUP to reload the budget")
    exporter.post_usage(EVENT)
    # New price: 1M × $2.00/M = $2.00 (not the list $2.50).
    assert metric_value(exporter.metrics(), "llm_cost_usd_total", model="gpt-4o") == 2.0

    # A bad config is refused, with its problems named, and the running one kept.
    config["budgets"][0]["daily_usd"] = -5
    exporter.config_path.write_text(yaml.safe_dump(config))
    r = httpx.post(f"{exporter.url}/-/reload")
    assert r.status_code == 400
    assert r.json()["errors"] == ["budgets[0].daily_usd: must be > 0"]
    text = exporter.metrics()
    assert metric_value(text, "llm_exporter_config_last_reload_successful") == 0
    assert _budget_limit(exporter) == 20
    exporter.proc.send_signal(signal.SIGHUP)  # also refused by signal; process keeps running
    config["budgets"][0]["daily_usd"] = 30
    exporter.config_path.write_text(yaml.safe_dump(config))
    assert httpx.post(f"{exporter.url}/-/reload").json()["status"] == "reloaded"
    assert _budget_limit(exporter) == 30
    assert metric_value(exporter.metrics(), "llm_exporter_config_last_reload_successful") == 1


def test_metrics_auth_bearer_and_basic(exporter_factory: Callable[..., ExporterProcess],
                                       tmp_path: Path) -> None:
    users = tmp_path / "metrics-users"
    users.write_text("prometheus:scrape-password-1\n")
    (tmp_path / "metrics-tokens").write_text(f"{TOKEN}\n")
    exporter = exporter_factory({"metrics": {"basic_auth_file": str(users),
                                             "tokens_file": str(tmp_path / "metrics-tokens")}})
    url = f"{exporter.url}/metrics"
    assert httpx.get(url).status_code == 401
    basic = base64.b64encode(b"prometheus:scrape-password-1").decode()
    wrong = base64.b64encode(b"prometheus:scrape-password-2").decode()
    assert httpx.get(url, headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": "Bearer nope-nope-nope-nope"}
                     ).status_code == 401
    assert httpx.get(f"{exporter.url}/healthz").status_code == 200  # probes stay open


def test_proxy_auth_is_required_when_configured(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider,
        tmp_path: Path) -> None:
    fake.reset()
    (tmp_path / "proxy-tokens").write_text(f"{TOKEN}\n")
    exporter = exporter_factory({
        "upstreams": [{"name": "openai", "base_url": fake.url}],
        "proxy": {"tokens_file": str(tmp_path / "proxy-tokens")}})
    url = f"{exporter.url}/openai/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    denied = httpx.post(url, json=body, headers={"Authorization": "Bearer sk-provider"})
    assert denied.status_code == 407
    assert denied.json()["error"]["code"] == "proxy_auth_required"
    assert fake.received == []
    ok = httpx.post(url, json=body, headers={"Authorization": "Bearer sk-provider",
                                             "Proxy-Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    # The proxy credential is ours: it never reaches the provider.
    assert "proxy-authorization" not in fake.received[-1].headers
    assert fake.received[-1].headers["authorization"] == "Bearer sk-provider"


def _serve(config: Path, listen: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llm_cost_exporter", "serve", "--config",
                           str(config), "--listen", listen, *extra], capture_output=True,
                          text=True, timeout=30)


def test_refuses_public_listen_without_auth(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"ledger: {{path: {tmp_path / 'l.db'}}}\n")
    result = _serve(config, "0.0.0.0:1")
    assert result.returncode == 2
    assert "0.0.0.0 is not a loopback address and auth is off for ingest" in result.stderr


def test_tls(exporter_factory: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    openssl = find_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    port = free_port()
    config = tmp_path / "tls.yaml"
    config.write_text(yaml.safe_dump({"ledger": {"path": str(tmp_path / "tls.db")},
                                      "tls": {"cert_file": str(cert), "key_file": str(key)}}))
    log = (tmp_path / "tls.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "llm_cost_exporter", "serve", "--config",
                             str(config), "--listen", f"127.0.0.1:{port}"], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        wait_until(lambda: httpx.get(f"https://127.0.0.1:{port}/readyz", verify=trust,
                                     timeout=1).status_code == 200, 20, "TLS exporter")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).raise_for_status()
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real filesystem that can be filled up (tests run as root in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs (needs root): {result.stderr}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_refuses_with_503_and_recovers(
        exporter_factory: Callable[..., ExporterProcess], small_disk: Path) -> None:
    exporter = exporter_factory({"ledger": {"path": str(small_disk / "ledger.db")}})
    assert exporter.post_usage(EVENT).status_code == 202
    filler = small_disk / "filler"
    with filler.open("wb") as f:  # fill the disk to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    batch = [{**EVENT, "request_id": f"full-{i}", "user": "x" * 100} for i in range(200)]
    refused = exporter.post_usage(batch)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "ledger_unavailable"
    assert httpx.get(f"{exporter.url}/readyz").status_code == 503
    text = exporter.metrics()
    assert metric_value(text, "llm_exporter_ledger_up") == 0
    assert (metric_value(text, "llm_exporter_ledger_write_errors_total") or 0) >= 1
    # Nothing of the refused batch was counted.
    assert metric_value(text, "llm_requests_total", model="gpt-4o") == 1
    filler.unlink()
    wait_until(lambda: httpx.get(f"{exporter.url}/readyz").status_code == 200, 10,
               "readiness after the disk has room again")
    assert exporter.post_usage(batch).json() == {"accepted": 200, "duplicates": 0}
    assert metric_value(exporter.metrics(), "llm_requests_total", model="gpt-4o") == 201
    assert metric_value(exporter.metrics(), "llm_exporter_ledger_up") == 1
