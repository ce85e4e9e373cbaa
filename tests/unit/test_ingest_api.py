"""The ingest API and /metrics, in process, on a real SQLite ledger."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

from llm_cost_exporter.app import create_app
from llm_cost_exporter.clock import FixedClock
from llm_cost_exporter.config import parse_config
from llm_cost_exporter.ledger import BatchKey, BatchResult, IdempotencyConflict
from llm_cost_exporter.ledger.sqlite import SQLiteLedger
from llm_cost_exporter.price_db import GenAIPricesDB

from conftest import metric_value, payload

TOKEN = "ingest-token-abcdefghijkl"
ISSUE_EVENT = {
    "request_id": "r-1", "department": "engineering", "project": "ai-features",
    "provider": "openai", "model": "gpt-4o-2024-08-06",
    "usage": {"prompt_tokens": 2000, "completion_tokens": 500,
              "prompt_tokens_details": {"cached_tokens": 1536}},
    "latency_seconds": 1.9,
}
SERIES = {"department": "engineering", "project": "ai-features", "provider": "openai",
          "model": "gpt-4o-2024-08-06"}
BASE_CONFIG: dict[str, Any] = {
    "budgets": [
        {"department": "engineering", "project": "ai-features", "daily_usd": 300,
         "monthly_usd": 5000},
        {"department": "data-science", "project": "*", "daily_usd": 100, "monthly_usd": 2000,
         "timezone": "Asia/Ho_Chi_Minh"},
    ],
}


@pytest.fixture(scope="module")
def price_db() -> GenAIPricesDB:
    return GenAIPricesDB()


def make_client(tmp_path: Path, price_db: GenAIPricesDB, extra: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> TestClient:
    cfg = parse_config({**BASE_CONFIG, **(extra or {})}, tmp_path, env=env or {})
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    clock = FixedClock(datetime(2026, 3, 14, 12, tzinfo=UTC))
    return TestClient(create_app(cfg, ledger, clock, price_db=price_db))


@pytest.fixture
def client(tmp_path: Path, price_db: GenAIPricesDB) -> Iterator[TestClient]:
    with make_client(tmp_path, price_db) as c:
        yield c


def metrics(client: TestClient) -> str:
    return client.get("/metrics").text


def test_issue_example_event_priced_on_metrics(client: TestClient) -> None:
    r = client.post("/v1/usage", json=ISSUE_EVENT)
    assert (r.status_code, r.json()) == (202, {"accepted": 1, "duplicates": 0})
    text = metrics(client)
    # gpt-4o list price 2.50/1.25 cached/10.00: 464×2.5 + 1536×1.25 + 500×10 = 0.00808
    assert metric_value(text, "llm_cost_usd_total", **SERIES) == pytest.approx(0.00808, abs=0)
    assert metric_value(text, "llm_tokens_total", **SERIES, token_type="input") == 464
    assert metric_value(text, "llm_tokens_total", **SERIES, token_type="cache_read") == 1536
    assert metric_value(text, "llm_tokens_total", **SERIES, token_type="output") == 500
    assert metric_value(text, "llm_requests_total", **SERIES, outcome="success") == 1
    assert metric_value(text, "llm_request_duration_seconds_bucket", provider="openai",
                        model="gpt-4o-2024-08-06", le="2.5") == 1
    budget = {"department": "engineering", "project": "ai-features"}
    assert metric_value(text, "llm_budget_spend_usd", **budget, period="daily") == 0.00808
    assert metric_value(text, "llm_budget_spend_usd", **budget, period="monthly") == 0.00808
    # 2026-04-01T00:00Z, end of the monthly period in UTC.
    assert metric_value(text, "llm_budget_period_end_timestamp_seconds", **budget,
                        period="monthly") == datetime(2026, 4, 1, tzinfo=UTC).timestamp()


def test_every_budget_scope_is_exported_before_any_traffic(client: TestClient) -> None:
    text = metrics(client)
    for dept, project, period, limit in [("engineering", "ai-features", "daily", 300),
                                         ("engineering", "ai-features", "monthly", 5000),
                                         ("data-science", "*", "daily", 100),
                                         ("data-science", "*", "monthly", 2000)]:
        labels = {"department": dept, "project": project, "period": period}
        assert metric_value(text, "llm_budget_limit_usd", **labels) == limit
        assert metric_value(text, "llm_budget_spend_usd", **labels) == 0
        assert metric_value(text, "llm_budget_warning_ratio", **labels) == 0.8


def test_retry_is_counted_once(client: TestClient) -> None:
    assert client.post("/v1/usage", json=ISSUE_EVENT).json() == {"accepted": 1, "duplicates": 0}
    assert client.post("/v1/usage", json=[ISSUE_EVENT]).json() == {"accepted": 0,
                                                                   "duplicates": 1}
    assert metric_value(metrics(client), "llm_requests_total", **SERIES, outcome="success") == 1


def test_idempotency_key_makes_a_batch_retry_safe_without_request_ids(
        client: TestClient, tmp_path: Path) -> None:
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    body = json.dumps([event, event]).encode()  # two calls, no request_id: both are new
    headers = {"Idempotency-Key": "batch-7f3a", "Content-Type": "application/json"}
    first = client.post("/v1/usage", content=body, headers=headers)
    assert (first.status_code, first.json()) == (202, {"accepted": 2, "duplicates": 0})
    assert "idempotent-replayed" not in first.headers
    # The same bytes again (a retry after a lost answer): the first answer, nothing written.
    again = client.post("/v1/usage", content=body, headers=headers)
    assert (again.status_code, again.json()) == (202, {"accepted": 2, "duplicates": 0})
    assert again.headers["idempotent-replayed"] == "true"
    # The structured-field form of the IETF draft names the same key.
    quoted = client.post("/v1/usage", content=body,
                         headers={**headers, "Idempotency-Key": '"batch-7f3a"'})
    assert quoted.headers["idempotent-replayed"] == "true"
    # Without ingest tokens keys live in their own namespace ("-:"), which no token's
    # scope (16 hex digits) can name.
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        assert db.execute("SELECT key FROM ingest_keys").fetchall() == [("-:batch-7f3a",)]
    text = metrics(client)
    assert metric_value(text, "llm_requests_total", **SERIES, outcome="success") == 2
    # 2 x $0.00808 (see test_issue_example_event_priced_on_metrics) = $0.01616
    assert metric_value(text, "llm_cost_usd_total", **SERIES) == pytest.approx(0.01616, abs=0)
    budget = {"department": "engineering", "project": "ai-features", "period": "daily"}
    assert metric_value(text, "llm_budget_spend_usd", **budget) == pytest.approx(0.01616,
                                                                                  abs=1e-12)


def test_idempotency_key_reused_for_another_body_is_refused(client: TestClient) -> None:
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    headers = {"Idempotency-Key": "k-1"}
    assert client.post("/v1/usage", json=[event], headers=headers).status_code == 202
    other = client.post("/v1/usage", json=[event, event], headers=headers)
    assert other.status_code == 422
    assert other.json()["error"] == "idempotency_key_reused"
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert metric_value(metrics(client), "llm_requests_total", **SERIES,
                        outcome="success") == 1
    # A rejected body does not use its key up: fixed and resent, it is accepted.
    bad = client.post("/v1/usage", json=[{**event, "status": "maybe"}],
                      headers={"Idempotency-Key": "k-2"})
    assert bad.status_code == 422
    ok = client.post("/v1/usage", json=[event], headers={"Idempotency-Key": "k-2"})
    assert (ok.status_code, ok.json()) == (202, {"accepted": 1, "duplicates": 0})


def test_a_key_stored_with_the_old_digest_still_replays(tmp_path: Path,
                                                       price_db: GenAIPricesDB) -> None:
    """Keys stored before SHA-256 hold a 16-byte BLAKE2b digest of the body."""
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    body = json.dumps([event]).encode()
    with sqlite3.connect(tmp_path / "ledger.db") as db:  # as an older exporter left it
        SQLiteLedger(tmp_path / "ledger.db").close()
        db.execute("INSERT INTO ingest_keys (key, digest, accepted, duplicates, recorded_at) "
                   "VALUES ('-:old-key', ?, 1, 0, 0)",
                   (hashlib.blake2b(body, digest_size=16).digest(),))
    with make_client(tmp_path, price_db) as client:
        headers = {"Idempotency-Key": "old-key", "Content-Type": "application/json"}
        again = client.post("/v1/usage", content=body, headers=headers)
        assert (again.status_code, again.json()) == (202, {"accepted": 1, "duplicates": 0})
        assert again.headers["idempotent-replayed"] == "true"
        other = client.post("/v1/usage", content=json.dumps([event, event]), headers=headers)
        assert other.json()["error"] == "idempotency_key_reused"
        # Nothing was written by either: the first answer came from the stored key.
        assert "llm_requests_total{" not in metrics(client)


def test_an_old_digest_stored_after_the_check_still_replays(tmp_path: Path,
                                                            price_db: GenAIPricesDB) -> None:
    """A retry whose key another (older) replica commits between this request's check and
    its own commit: the commit finds the BLAKE2b digest, and the answer is still a replay."""
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    body = json.dumps([event]).encode()

    class LateLedger(SQLiteLedger):
        """The real ledger, except that the first key lookup comes before the other
        replica's commit is visible (it sees nothing)."""
        looked = 0

        def lookup_key(self, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
            self.looked += 1
            return None if self.looked == 1 else super().lookup_key(key)

    ledger = LateLedger(tmp_path / "ledger.db")
    # The other replica's commit: the key, with the old digest of the same body (its batch
    # held no events here, so its answer, replayed, says 0 accepted: a new commit would
    # have said 1).
    assert ledger.record([[]], [BatchKey("-:late-key", hashlib.blake2b(
        body, digest_size=16).digest())]) == [BatchResult(0, 0)]
    cfg = parse_config(BASE_CONFIG, tmp_path, env={})
    clock = FixedClock(datetime(2026, 3, 14, 12, tzinfo=UTC))
    with TestClient(create_app(cfg, ledger, clock, price_db=price_db)) as client:
        again = client.post("/v1/usage", content=body, headers={
            "Idempotency-Key": "late-key", "Content-Type": "application/json"})
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (202, "true")
        assert again.json() == {"accepted": 0, "duplicates": 0}
        assert ledger.looked == 2  # the check, then the old digest after the conflict
        assert "llm_requests_total{" not in metrics(client)


KEY_ERROR = {"field": "Idempotency-Key", "message": "must be one key of 1-255 visible ASCII "
                                                   "characters, bare or as a quoted string"}


@pytest.mark.parametrize("key", ["", "   ", '""', '"', "x" * 256, "caf\u00e9", "a\tb", "a b",
                                 "a, b", '"k";p=1', '"a\\x"'])
def test_bad_idempotency_key_is_named_with_the_body_errors(client: TestClient,
                                                             key: str) -> None:
    headers = [("Idempotency-Key", key.encode("utf-8"))]
    r = client.post("/v1/usage", json={**ISSUE_EVENT, "status": "maybe"},
                    headers=headers)  # type: ignore[arg-type]
    assert r.status_code == 422
    # Every problem at once: the key's, and the body's own.
    assert r.json()["errors"] == [KEY_ERROR, {
        "field": "status", "message": "must be an HTTP status code or one of success, error, "
                                      "client_closed"}]
    assert metric_value(metrics(client), "llm_requests_total", **SERIES) is None


def test_two_idempotency_keys_are_refused(client: TestClient) -> None:
    r = client.post("/v1/usage", json=ISSUE_EVENT, headers=[
        ("Idempotency-Key", "a"), ("Idempotency-Key", "b")])  # type: ignore[arg-type]
    assert (r.status_code, r.json()["errors"]) == (422, [
        {"field": "Idempotency-Key", "message": "sent more than once: send one key"}])


def test_quoted_and_bare_forms_and_escapes_name_the_same_key(client: TestClient) -> None:
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    body = json.dumps(event).encode()
    first = client.post("/v1/usage", content=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    for form in ('"k-1"', "  k-1  "):
        again = client.post("/v1/usage", content=body, headers={"Idempotency-Key": form})
        assert again.headers["idempotent-replayed"] == "true", form
    # A quote inside a key can only travel escaped in the quoted form.
    quoted = client.post("/v1/usage", content=body, headers={"Idempotency-Key": '"a\\"b"'})
    assert quoted.status_code == 202 and "idempotent-replayed" not in quoted.headers
    assert client.post("/v1/usage", content=body, headers={
        "Idempotency-Key": '"a\\"b"'}).headers["idempotent-replayed"] == "true"


def test_a_replay_or_a_conflict_changes_no_label_state(tmp_path: Path,
                                                       price_db: GenAIPricesDB) -> None:
    with make_client(tmp_path, price_db, {"labels": {"max_values_per_label": 2}}) as c:
        def send(project: str, key: str) -> int:
            event = {"provider": "openai", "model": "gpt-4o", "project": project,
                     "tokens": {"input": 10}}
            return c.post("/v1/usage", json=event, headers={"Idempotency-Key": key}
                          ).status_code
        # The default project `unattributed` never appears: every event names its own.
        assert send("cap-1", "k1") == 202
        assert send("cap-2", "k1") == 422          # conflict: must not take a label slot
        assert send("cap-3", "k3") == 202
        assert [send("cap-3", "k3") for _ in range(5)] == [202] * 5  # replays
        text = metrics(c)
        assert metric_value(text, "llm_requests_total", project="cap-3") == 1
        assert metric_value(text, "llm_requests_total", project="other") is None
        assert metric_value(text, "llm_label_overflow_total", label="project") in (None, 0)


def test_a_recorded_batch_is_replayed_even_after_stricter_rules(
        tmp_path: Path, price_db: GenAIPricesDB) -> None:
    event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
    body = json.dumps([event] * 3).encode()
    headers = {"Idempotency-Key": "before-reload", "Content-Type": "application/json"}
    with make_client(tmp_path, price_db) as c:
        assert c.post("/v1/usage", content=body, headers=headers).status_code == 202
    # The same ledger under a config that now refuses batches of more than 2 events.
    with make_client(tmp_path, price_db, {"ingest": {"max_batch_events": 2}}) as c:
        again = c.post("/v1/usage", content=body, headers=headers)
        assert (again.status_code, again.json()) == (202, {"accepted": 3, "duplicates": 0})
        assert again.headers["idempotent-replayed"] == "true"
        assert metric_value(metrics(c), "llm_requests_total", **SERIES) == 3


def test_idempotency_keys_are_per_ingest_token(tmp_path: Path, price_db: GenAIPricesDB) -> None:
    team_a, team_b = "team-a-token-0123456789", "team-b-token-0123456789"
    env = {"INGEST_TOKENS": f"{team_a},{team_b}"}
    with make_client(tmp_path, price_db, {"ingest": {"tokens_env": "INGEST_TOKENS"}},
                     env=env) as c:
        event = {k: v for k, v in ISSUE_EVENT.items() if k != "request_id"}
        replayed = []
        for token in (team_a, team_b, team_a):
            r = c.post("/v1/usage", json=[event], headers={
                "Idempotency-Key": "batch-1", "Authorization": f"Bearer {token}"})
            assert r.status_code == 202
            replayed.append(r.headers.get("idempotent-replayed"))
        # Two teams' batch-1 are two batches; team A's second send is a replay.
        assert replayed == [None, None, "true"]
        assert metric_value(metrics(c), "llm_requests_total", **SERIES) == 2
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM ingest_keys ORDER BY key")]
    assert len(keys) == 2 and all(k.endswith(":batch-1") for k in keys)
    # The stored scope is a hash: no token appears in the ledger.
    assert not any(team_a in k or team_b in k for k in keys)


def test_a_cost_the_ledger_cannot_hold_names_its_event(tmp_path: Path,
                                                     price_db: GenAIPricesDB) -> None:
    (tmp_path / "pricing.yaml").write_text(
        "models:\n  - {model: pricey, provider: vllm, input: 10000000, output: 1}\n")
    with make_client(tmp_path, price_db, {"pricing": {"overrides": "pricing.yaml"}}) as c:
        ok = {"provider": "vllm", "model": "pricey", "tokens": {"input": 1}}
        # 1,000,000,000 tokens x $10,000,000 per 1M = $10,000,000,000,000 for one call: past
        # what the spend slots hold (about 4.6 million USD per call), refused, not wrapped.
        huge = {**ok, "tokens": {"input": 1_000_000_000}}
        r = c.post("/v1/usage", json=[ok, huge], headers={"Idempotency-Key": "k"})
        assert r.status_code == 422
        assert r.json()["errors"] == [{"field": "events[1]", "message": (
            "its cost is out of range (over 4.6 million USD for one call: check its token "
            "counts)")}]
        assert c.post("/v1/usage", json=huge).json()["errors"][0]["field"] == "body"
        # Nothing was written, and the key was not used up.
        assert metric_value(metrics(c), "llm_requests_total", model="pricey") is None
        again = c.post("/v1/usage", json=[ok], headers={"Idempotency-Key": "k"})
        assert (again.status_code, again.json()) == (202, {"accepted": 1, "duplicates": 0})


def test_a_batch_the_ledger_refuses_takes_no_label_slot(tmp_path: Path,
                                                       price_db: GenAIPricesDB) -> None:
    (tmp_path / "pricing.yaml").write_text(
        "models:\n  - {model: pricey, provider: vllm, input: 10000000, output: 1}\n")
    extra = {"pricing": {"overrides": "pricing.yaml"}, "labels": {"max_values_per_label": 2}}
    with make_client(tmp_path, price_db, extra) as c:
        def ev(project: str, tokens: int = 1) -> dict[str, Any]:
            return {"provider": "vllm", "model": "pricey", "department": "engineering",
                    "project": project, "tokens": {"input": tokens}}
        refused = c.post("/v1/usage", json=[ev("big-a"), ev("big-b", 1_000_000_000)])
        assert refused.status_code == 422
        # Neither big-a nor big-b was recorded, so both slots are still free.
        assert c.post("/v1/usage", json=[ev("p-1"), ev("p-2"), ev("p-3")]).status_code == 202
        text = metrics(c)
        assert [metric_value(text, "llm_requests_total", project=p) for p in
                ("p-1", "p-2", "other", "big-a")] == [1, 1, 1, None]
        # Overflow counts recorded events only: p-3's, not the refused batch's.
        assert metric_value(text, "llm_label_overflow_total", label="project") == 1


def test_batch_with_one_bad_event_writes_nothing(client: TestClient, tmp_path: Path) -> None:
    good = {**ISSUE_EVENT, "request_id": "good"}
    bad = {**ISSUE_EVENT, "request_id": "bad",
           "usage": {"prompt_tokens": 10, "completion_tokens": -3}}
    future = {**ISSUE_EVENT, "request_id": "future", "timestamp": "2026-03-15T12:00:00Z"}
    r = client.post("/v1/usage", json=[good, bad, future])
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {"field": "events[1].usage.completion_tokens",
         "message": "must be a non-negative integer"},
        {"field": "events[2].timestamp", "message": "is more than 300 s in the future"},
    ]
    assert metric_value(metrics(client), "llm_requests_total", **SERIES, outcome="success") is None
    # Nothing reached the ledger: the good event can still be sent and is new.
    assert client.post("/v1/usage", json=good).json() == {"accepted": 1, "duplicates": 0}


def test_all_three_usage_forms_and_timestamps(client: TestClient) -> None:
    events = [
        {"provider": "anthropic", "response": payload("anthropic_messages_cache.json"),
         "department": "engineering", "project": "ai-features", "timestamp": 1773489600},
        {"provider": "anthropic", "response": payload("anthropic_stream.sse"),
         "department": "engineering", "project": "ai-features",
         "timestamp": "2026-03-14T18:00:00+07:00"},
        {"provider": "openai", "model": "gpt-4o", "department": "engineering",
         "project": "ai-features", "tokens": {"input": 1000, "cache_read": 0, "output": 100}},
    ]
    r = client.post("/v1/usage", json=events)
    assert r.json() == {"accepted": 3, "duplicates": 0}
    text = metrics(client)
    sonnet = {**SERIES, "provider": "anthropic", "model": "claude-sonnet-4-5-20250929"}
    assert metric_value(text, "llm_cost_usd_total", **sonnet) == 0.02547  # see test_pricing
    assert metric_value(text, "llm_tokens_total", **sonnet, token_type="cache_write") == 3000
    haiku = {**sonnet, "model": "claude-haiku-4-5-20251001"}
    assert metric_value(text, "llm_cost_usd_total", **haiku) == 0.0095
    # gpt-4o: 1000×2.50 + 100×10 = 0.0035
    assert metric_value(text, "llm_cost_usd_total", **SERIES | {"model": "gpt-4o"}) == 0.0035
    # Month to date: 0.02547 + 0.0095 + 0.0035 = 0.03847
    spend = metric_value(text, "llm_budget_spend_usd", department="engineering",
                         project="ai-features", period="monthly")
    assert spend == pytest.approx(0.03847, abs=1e-15)


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}, "timestamp": 1.7e12},
     "timestamp", "looks like milliseconds: send epoch seconds"),
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1},
      "timestamp": "2026-03-14T10:00:00"}, "timestamp",
     "must carry a time zone offset (e.g. Z or +07:00)"),
    ({"provider": "Open AI!", "model": "m", "usage": {"prompt_tokens": 1}}, "provider",
     "must match [a-z0-9][a-z0-9._-]{0,63}"),
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}, "project": "x" * 129},
     "project", "longer than 128 characters"),
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}, "latency_seconds": -1},
     "latency_seconds", "must be a number of seconds in [0, 86400]"),
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}, "status": "ok"},
     "status", "must be an HTTP status code or one of success, error, client_closed"),
    ({"provider": "openai", "model": "m", "tokens": {"input": 1, "output": 1, "reasoning": 2}},
     "tokens.reasoning", "must not exceed output (it is a subset of output)"),
    ({"provider": "openai", "model": "m", "usage": {"prompt_tokens": 1}, "departmnet": "x"},
     "departmnet", "unknown field"),
    ({"provider": "openai", "response": {"usage": {"prompt_tokens": 1}}}, "model",
     "is required (or send a response body that names it)"),
])
def test_bad_fields_are_named(client: TestClient, body: dict[str, Any], field: str,
                              message: str) -> None:
    r = client.post("/v1/usage", json=body)
    assert r.status_code == 422
    assert {"field": field, "message": message} in r.json()["errors"]


def test_invalid_json_nan_and_non_object(client: TestClient) -> None:
    r = client.post("/v1/usage", content=b'{"provider": "openai", "x": NaN}')
    assert r.status_code == 400 and "NaN" in r.json()["message"]
    assert client.post("/v1/usage", content=b"{not json").status_code == 400
    r = client.post("/v1/usage", json="just a string")
    assert (r.status_code, r.json()["errors"][0]["field"]) == (422, "body")
    assert client.post("/v1/usage", content=b"[" * 100_000).status_code == 400


def test_auth_and_body_limit(tmp_path: Path, price_db: GenAIPricesDB) -> None:
    extra = {"ingest": {"tokens_env": "T", "max_body_bytes": 2048}}
    with make_client(tmp_path, price_db, extra, env={"T": TOKEN}) as c:
        assert c.post("/v1/usage", json=ISSUE_EVENT).status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
        assert c.post("/v1/usage", json=ISSUE_EVENT, headers=wrong).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post("/v1/usage", json=ISSUE_EVENT, headers=good).status_code == 202
        big = json.dumps([ISSUE_EVENT] * 20).encode()
        assert len(big) > 2048
        r = c.post("/v1/usage", content=big, headers=good)
        assert (r.status_code, r.json()["error"]) == (413, "too_large")
        text = c.get("/metrics").text
        assert metric_value(text, "llm_exporter_ingest_rejected_total", reason="unauthorized") == 2
        assert metric_value(text, "llm_exporter_ingest_rejected_total", reason="too_large") == 1
        assert TOKEN not in text


def test_unpriced_model_is_counted_and_costs_zero(client: TestClient) -> None:
    body = {"provider": "openai", "model": "ft:my-secret-finetune", "tokens": {"input": 5}}
    assert client.post("/v1/usage", json=[body, body]).status_code == 202
    text = metrics(client)
    assert metric_value(text, "llm_unpriced_requests_total", provider="openai",
                        model="ft:my-secret-finetune") == 2
    assert metric_value(text, "llm_cost_usd_total", model="ft:my-secret-finetune") == 0
    # Sent without attribution: the configured defaults apply.
    assert metric_value(text, "llm_requests_total", model="ft:my-secret-finetune",
                        department="unattributed", project="unattributed") == 2


def test_label_cap_turns_new_values_into_other(tmp_path: Path, price_db: GenAIPricesDB) -> None:
    extra = {"labels": {"max_values_per_label": 2}}
    with make_client(tmp_path, price_db, extra) as c:
        events = [{"provider": "openai", "model": "gpt-4o", "department": "engineering",
                   "project": f"p{i}", "tokens": {"input": 1}} for i in range(5)]
        # ai-features is known from the budgets, so it never overflows.
        events.append({**events[0], "project": "ai-features"})
        assert c.post("/v1/usage", json=events).json()["accepted"] == 6
        text = c.get("/metrics").text
        # unattributed (the default) is known too; p0 and p1 fill the cap of 2.
        projects = {s for s in ("p0", "p1", "p2", "p3", "p4", "other", "ai-features")
                    if metric_value(text, "llm_requests_total", project=s) is not None}
        assert projects == {"p0", "p1", "other", "ai-features"}
        assert metric_value(text, "llm_requests_total", project="other") == 3
        assert metric_value(text, "llm_label_overflow_total", label="project") == 3


def test_openmetrics_negotiation(client: TestClient) -> None:
    client.post("/v1/usage", json=ISSUE_EVENT)
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    assert "llm_cost_usd_total{" in r.text
    # prometheus_client's strict OpenMetrics parser accepts the whole exposition.
    families = {f.name: f for f in om_parse(r.text)}
    cost = next(s for s in families["llm_cost_usd"].samples if s.labels["model"] ==
                "gpt-4o-2024-08-06")
    assert (families["llm_cost_usd"].type, cost.value) == ("counter", 0.00808)
    assert families["llm_request_duration_seconds"].type == "histogram"
    plain = client.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_a_raw_provider_response_gets_told_how_to_wrap_it(client: TestClient) -> None:
    r = client.post("/v1/usage", json=payload("anthropic_messages_cache.json"))
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "body", "message": (
        'looks like a provider response body: send {"provider": ..., "response": '
        '<that body>} instead')}]
