"""Secrets (issue #5): known secrets sent through every path never come out anywhere.

README, Security: tokens and provider keys are "never logged, exported, echoed in errors or
stored in the ledger". Each secret here is random per run (so a match cannot be a
coincidence) and is searched for by every 10-character piece of its random part, so a
truncated or partial copy is found too. Positive controls check that each
secret really travelled its path (else a clean search would prove nothing).
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import ExporterProcess, free_port
from fixtures.fake_provider import FakeProvider
from helpers.robustness import ledger_bytes

WINDOW = 10  # hex characters: 16**10 ≈ 1e12 values, so a chance match is negligible


@dataclass
class Secret:
    name: str
    value: str

    @property
    def pieces(self) -> list[str]:
        """Every WINDOW-long piece of the random part: none may appear, so a truncated or
        partial copy counts as a leak too (e.g. a log of the first 20 characters of
        "Bearer sk-<random>")."""
        random = self.value[-32:]
        return [random[i:i + WINDOW] for i in range(len(random) - WINDOW + 1)]


def _secret(name: str, prefix: str) -> Secret:
    # A short prefix, so that little beyond the random part is predictable.
    return Secret(name, prefix + secrets.token_hex(16))


@dataclass
class Seen:
    """Everything the exporter said to anyone: bodies and headers of every answer."""

    answers: list[str] = field(default_factory=list)

    def add(self, r: httpx.Response) -> httpx.Response:
        # Raw bytes (not r.text): a secret must not hide behind an encoding either.
        self.answers.append(f"{r.status_code} {dict(r.headers)!r} "
                            f"{r.content.decode('latin-1')}")
        return r


def _leaks(where: str, data: str, all_secrets: list[Secret]) -> list[str]:
    return [f"{s.name} found in {where}" for s in all_secrets
            if any(piece in data for piece in s.pieces)]


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
CLAUDE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
          "messages": [{"role": "user", "content": "hi"}]}
TEAM = {"X-LLM-Department": "engineering", "X-LLM-Project": "secrets"}


def test_secrets_sent_through_every_path_never_come_out(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.reset()
    ingest = _secret("ingest token", "it-")
    ingest_2 = _secret("second ingest token", "i2-")
    upstream = _secret("upstream api_key_env", "sk-")
    client_openai = _secret("client Authorization", "sk-")
    client_azure = _secret("client api-key header", "az-")
    client_anthropic = _secret("client x-api-key", "sk-ant-")
    client_gemini = _secret("client ?key= and x-goog-api-key", "AIza")
    wrong = _secret("a wrong ingest token", "wr-")
    all_secrets = [ingest, ingest_2, upstream, client_openai, client_azure, client_anthropic,
                   client_gemini, wrong]
    # Env vars are read by the exporter process at start (Popen inherits os.environ).
    monkeypatch.setenv("LCE_TEST_INGEST_TOKENS", f"{ingest.value}, {ingest_2.value}")
    monkeypatch.setenv("LCE_TEST_UPSTREAM_KEY", upstream.value)
    ledger = tmp_path / "secrets.db"
    config = {
        "ledger": {"path": str(ledger)},
        # DEBUG: whatever the exporter (or a library) logs at any level is searched.
        "log": {"level": "DEBUG"},
        "ingest": {"tokens_env": "LCE_TEST_INGEST_TOKENS", "max_body_bytes": 4096},
        "proxy": {"max_request_bytes": 4096},
        "upstreams": [
            {"name": "openai", "base_url": fake.url, "format": "openai",
             "api_key_env": "LCE_TEST_UPSTREAM_KEY"},
            {"name": "anthropic", "base_url": fake.url, "format": "anthropic"},
            {"name": "gemini", "base_url": fake.url, "format": "gemini"},
            {"name": "down", "base_url": f"http://127.0.0.1:{free_port()}", "format": "openai",
             "api_key_env": "LCE_TEST_UPSTREAM_KEY", "connect_timeout_seconds": 2}],
        "budgets": [{"department": "engineering", "project": "capped", "daily_usd": 0.000001,
                     "enforce": True}],
    }
    exporter = exporter_factory(config)
    seen = Seen()
    url = exporter.url
    bearer = {"Authorization": f"Bearer {ingest.value}"}
    event = {"provider": "openai", "model": "gpt-4o", "department": "engineering",
             "project": "secrets", "tokens": {"input": 10}}

    with httpx.Client(timeout=30) as http:
        # -- ingest: accepted with either token, refused with a wrong or no token -------------
        assert seen.add(http.post(f"{url}/v1/usage", json=event,
                                  headers=bearer)).status_code == 202
        assert seen.add(http.post(f"{url}/v1/usage", json=event, headers={
            "Authorization": f"Bearer {ingest_2.value}"})).status_code == 202
        for headers in ({"Authorization": f"Bearer {wrong.value}"},
                        {"Authorization": wrong.value},  # no "Bearer " prefix
                        {"Authorization": f"Basic {wrong.value}"}, {}):
            assert seen.add(http.post(f"{url}/v1/usage", json=event,
                                      headers=headers)).status_code == 401
        # Error answers with a valid token: 422, 400, 413, and a secret inside the body that
        # an error message might quote back.
        assert seen.add(http.post(f"{url}/v1/usage", json={**event, "tokens": {"input": -1}},
                                  headers=bearer)).status_code == 422
        assert seen.add(http.post(f"{url}/v1/usage", content=b"{not json", headers={
            **bearer, "Content-Type": "application/json"})).status_code == 400
        assert seen.add(http.post(f"{url}/v1/usage", content=b"x" * 10_000, headers={
            **bearer, "Content-Type": "application/json"})).status_code == 413
        # The token sent where it does not belong is not echoed either.
        for path in ("/metrics", "/healthz", "/readyz", "/", "/nope"):
            seen.add(http.get(f"{url}{path}", headers=bearer))

        # -- proxy, upstream with its own key: the client's keys are replaced ----------------
        client_keys = {"Authorization": f"Bearer {client_openai.value}",
                       "api-key": client_azure.value, **TEAM}
        r = seen.add(http.post(f"{url}/openai/v1/chat/completions", json=CHAT,
                               headers=client_keys))
        assert r.status_code == 200, r.text
        with http.stream("POST", f"{url}/openai/v1/chat/completions", headers=client_keys,
                         json={**CHAT, "stream": True}) as stream:
            streamed = b"".join(stream.iter_bytes())
        seen.answers.append(streamed.decode("latin-1"))
        assert streamed.endswith(b"data: [DONE]\n\n")
        fake.mode = "error500"  # the provider's error passes through; ours adds nothing
        assert seen.add(http.post(f"{url}/openai/v1/chat/completions", json=CHAT,
                                  headers=client_keys)).status_code == 500
        fake.mode = "drop_mid_stream"  # a provider that breaks off mid-answer (logged)
        # The cut-off reaches the client as a broken stream: expected.
        with contextlib.suppress(httpx.HTTPError), http.stream(
                "POST", f"{url}/openai/v1/chat/completions", headers=client_keys,
                json={**CHAT, "stream": True}) as stream:
            seen.answers.append(b"".join(stream.iter_bytes()).decode("latin-1"))
        fake.mode = "ok"
        for status, extra, body in (
                (400, {"X-LLM-Project": "x" * 500}, CHAT),  # bad attribution header
                (413, {}, {**CHAT, "pad": "x" * 10_000}),  # over proxy.max_request_bytes
                (429, {"X-LLM-Project": "capped"}, CHAT)):  # budget spent (after 1st call)
            if status == 429:  # spend something first: the limit is $0.000001
                seen.add(http.post(f"{url}/openai/v1/chat/completions", json=CHAT,
                                   headers={**client_keys, **extra}))
            r = seen.add(http.post(f"{url}/openai/v1/chat/completions", json=body,
                                   headers={**client_keys, **extra}))
            assert r.status_code == status, r.text
        r = seen.add(http.post(f"{url}/down/v1/chat/completions", json=CHAT,
                               headers=client_keys))
        assert r.status_code == 502, r.text

        # -- proxy, upstream without a key: the client's key is forwarded -------------------
        ant = {"x-api-key": client_anthropic.value, "anthropic-version": "2023-06-01", **TEAM}
        assert seen.add(http.post(f"{url}/anthropic/v1/messages", json=CLAUDE,
                                  headers=ant)).status_code == 200
        with http.stream("POST", f"{url}/anthropic/v1/messages", headers=ant,
                         json={**CLAUDE, "stream": True}) as stream:
            seen.answers.append(b"".join(stream.iter_bytes()).decode("latin-1"))
        gem = {"x-goog-api-key": client_gemini.value, **TEAM}
        r = seen.add(http.post(
            f"{url}/gemini/v1beta/models/gemini-2.5-flash:generateContent"
            f"?key={client_gemini.value}", headers=gem,
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}))
        assert r.status_code == 200, r.text

        for accept in ("text/plain", "application/openmetrics-text"):
            metrics = http.get(f"{url}/metrics", headers={"Accept": accept})
            assert metrics.status_code == 200
            seen.answers.append(metrics.text)

    # Positive controls: every secret really went where it should.
    sent = [r.headers for r in fake.received]
    assert f"Bearer {upstream.value}" in [h.get("authorization") for h in sent]
    assert client_anthropic.value in [h.get("x-api-key") for h in sent]
    assert client_gemini.value in [h.get("x-goog-api-key") for h in sent]
    assert _leaks("upstream requests", json.dumps(sent), [client_openai, client_azure]) == [], \
        "a client key reached an upstream that has its own key"

    # Stopped gracefully, so the log and the ledger (WAL included) are complete.
    exporter.stop()
    assert exporter.log_path is not None
    log = exporter.log_path.read_bytes().decode("latin-1")
    assert "upstream broke mid-response" in log or '"level": "debug"' in log  # it did log
    leaks = _leaks("the exporter log", log, all_secrets)
    leaks += _leaks("the ledger file", ledger_bytes(ledger).decode("latin-1"), all_secrets)
    for i, answer in enumerate(seen.answers):
        leaks += _leaks(f"answer #{i} ({answer[:60]!r})", answer, all_secrets)
    assert leaks == [], leaks

    # The config tools print what was loaded, never the secrets.
    for args in (["check-config", "--config", str(exporter.config_path)],):
        out = subprocess.run([sys.executable, "-m", "llm_cost_exporter", *args],
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out
        assert _leaks("check-config output", (out.stdout + out.stderr).decode("latin-1"),
                      all_secrets) == []


def test_a_rejected_secret_is_not_printed_by_config_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A token too short to be accepted (< 16 characters) is still a secret: the error names
    # it by position only, in check-config's output and in serve's start-up failure.
    short = "sh0rt" + secrets.token_hex(4)  # 13 characters
    monkeypatch.setenv("LCE_TEST_SHORT", f"{'ok-' + secrets.token_hex(16)},{short}")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"ledger": {"path": str(tmp_path / "l.db")},
                                  "ingest": {"tokens_env": "LCE_TEST_SHORT"}}))
    for command in ("check-config", "serve"):
        out = subprocess.run([sys.executable, "-m", "llm_cost_exporter", command, "--config",
                              str(config)], capture_output=True, timeout=60)
        assert out.returncode != 0, out  # refused...
        text = (out.stdout + out.stderr).decode("latin-1")
        assert "shorter than 16" in text, text  # ...saying why...
        assert short not in text, f"{command} printed the rejected token: {text}"


def test_metrics_basic_auth_password_and_tokens_are_not_echoed(
        exporter_factory: Callable[..., ExporterProcess], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    # /metrics and proxy authentication are tested for behaviour elsewhere; here only their
    # secrets: a wrong or right one never comes back in an answer or the log.
    metrics_token = _secret("metrics token", "mt-")
    password = _secret("basic-auth password", "pw-")
    wrong = _secret("wrong metrics credential", "wr-")
    monkeypatch.setenv("LCE_TEST_METRICS_TOKENS", metrics_token.value)
    users = tmp_path / "users"
    users.write_text(f"prometheus:{password.value}\n")
    exporter = exporter_factory({"log": {"level": "DEBUG"}, "metrics": {
        "tokens_env": "LCE_TEST_METRICS_TOKENS", "basic_auth_file": str(users)}})
    good_basic = base64.b64encode(f"prometheus:{password.value}".encode()).decode()
    bad_basic = base64.b64encode(f"prometheus:{wrong.value}".encode()).decode()
    seen = Seen()
    with httpx.Client(timeout=30) as http:
        for header, status in ((f"Bearer {metrics_token.value}", 200),
                               (f"Basic {good_basic}", 200), (f"Bearer {wrong.value}", 401),
                               (f"Basic {bad_basic}", 401), (wrong.value, 401)):
            r = seen.add(http.get(f"{exporter.url}/metrics", headers={"Authorization": header}))
            assert r.status_code == status, (header, r.text)
    exporter.stop()
    assert exporter.log_path is not None
    log = exporter.log_path.read_bytes().decode("latin-1")
    leaks = _leaks("the exporter log", log, [metrics_token, password, wrong])
    for i, answer in enumerate(seen.answers):
        leaks += _leaks(f"answer #{i}", answer, [metrics_token, password, wrong])
    assert leaks == [], leaks
