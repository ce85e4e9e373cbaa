"""Two real exporter processes on one PostgreSQL database, as behind a load balancer.

List prices (genai-prices, USD per 1M tokens): gpt-4o input 2.50, cached 1.25, output 10;
gpt-4o-mini input 0.15, output 0.60. The events below and what they cost:
  r1 gpt-4o      input 1,000,000                       = 2.50
  r2 gpt-4o      output  100,000                       = 1.00
  r3 gpt-4o      input 200,000 + cache_read 800,000    = 0.50 + 1.00 = 1.50
  r4 gpt-4o-mini input 1,000,000                       = 0.15
  r5 gpt-4o-mini output 1,000,000                      = 0.60
  r6 gpt-4o      input 400,000                         = 1.00
  r7 gpt-4o      input 1,000,000, sent to BOTH replicas = 2.50, once
gpt-4o: 2.50 + 1.00 + 1.50 + 1.00 + 2.50 = 8.50; gpt-4o-mini: 0.15 + 0.60 = 0.75;
all: 9.25 over 7 requests.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llm_cost_exporter.ledger import pg_migrations

from conftest import ExporterProcess, metric_value
from helpers.postgres import count_events, replica_config

TEAM = {"department": "engineering", "project": "ai-features"}
BUDGETS = [{"department": "engineering", "project": "ai-features", "daily_usd": 100,
            "monthly_usd": 1000}]
EVENTS = [
    ("r1", "gpt-4o", {"input": 1_000_000}),
    ("r2", "gpt-4o", {"output": 100_000}),
    ("r3", "gpt-4o", {"input": 200_000, "cache_read": 800_000}),
    ("r4", "gpt-4o-mini", {"input": 1_000_000}),
    ("r5", "gpt-4o-mini", {"output": 1_000_000}),
    ("r6", "gpt-4o", {"input": 400_000}),
]


def event(request_id: str | None, model: str, tokens: dict[str, int]) -> dict[str, Any]:
    return {"request_id": request_id, **TEAM, "provider": "openai", "model": model,
            "tokens": tokens, "latency_seconds": 1.5}


def total(replicas: list[ExporterProcess], name: str, **labels: str) -> float:
    """sum() over replicas, as a Prometheus rule would compute it."""
    return sum(metric_value(r.metrics(), name, **labels) or 0.0 for r in replicas)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llm_cost_exporter", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_sums_over_replicas_count_each_event_once_and_budgets_agree(
        exporter_factory: Callable[..., ExporterProcess], pg_dsn: str, tmp_path: Path) -> None:
    a = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-a", budgets=BUDGETS))
    b = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-b", budgets=BUDGETS))
    for i, (rid, model, tokens) in enumerate(EVENTS):  # alternately: a, b, a, b, ...
        answer = (a, b)[i % 2].post_usage(event(rid, model, tokens))
        assert answer.status_code == 202 and answer.json() == {"accepted": 1, "duplicates": 0}
    # The same event to both replicas at once: exactly one of them records it.
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: r.post_usage(event("r7", "gpt-4o",
                                                             {"input": 1_000_000})), (a, b)))
    assert sorted(r.json()["accepted"] for r in answers) == [0, 1]

    series = {**TEAM, "provider": "openai"}
    assert total([a, b], "llm_cost_usd_total", **series, model="gpt-4o") == pytest.approx(8.50)
    assert total([a, b], "llm_cost_usd_total", **series, model="gpt-4o-mini") == (
        pytest.approx(0.75))
    requests = sum(total([a, b], "llm_requests_total", **series, model=m, outcome="success")
                   for m in ("gpt-4o", "gpt-4o-mini"))
    assert requests == 7 == count_events(pg_dsn)
    # input tokens: r1 1,000,000 + r3 200,000 + r6 400,000 + r7 1,000,000 = 2,600,000
    assert total([a, b], "llm_tokens_total", **series, model="gpt-4o", token_type="input") == (
        2_600_000)
    # Each replica's counters are its own share, not the whole.
    own = [metric_value(r.metrics(), "llm_cost_usd_total", **series, model="gpt-4o")
           for r in (a, b)]
    assert all(0 < (v or 0) < 8.5 for v in own)
    # Budget spend is the shared one: the same $9.25 on both (read at scrape time).
    for replica in (a, b):
        for period in ("daily", "monthly"):
            assert metric_value(replica.metrics(), "llm_budget_spend_usd", **TEAM,
                                period=period) == pytest.approx(9.25)
    # A restarted replica continues with its own counters, read back from its own rows.
    before = metric_value(a.metrics(), "llm_cost_usd_total", **series, model="gpt-4o")
    a.stop()
    a.start()
    assert metric_value(a.metrics(), "llm_cost_usd_total", **series, model="gpt-4o") == before


def test_migrate_and_copy_a_sqlite_ledger(exporter_factory: Callable[..., ExporterProcess],
                                          pg_dsn: str, tmp_path: Path) -> None:
    import yaml

    sidecar = exporter_factory({"budgets": BUDGETS, "log": {"level": "WARNING"},
                                "ledger": {"path": str(tmp_path / "sidecar.db")}})
    # Two identical events without request_id are two calls: both must arrive, once each.
    batch = [event(rid, model, tokens) for rid, model, tokens in EVENTS] + [
        event(None, "gpt-4o", {"input": 1_000_000})] * 2
    moved = {"Idempotency-Key": "batch-before-the-move"}
    assert sidecar.post_usage(batch, headers=moved).json() == {"accepted": 8, "duplicates": 0}
    sqlite_text = sidecar.metrics()
    sidecar.stop()

    config = tmp_path / "pg.yaml"
    config.write_text(yaml.safe_dump(replica_config(pg_dsn, tmp_path, "sidecar-1",
                                                    budgets=BUDGETS)))
    first, second = cli("migrate", "--config", str(config)), cli("migrate", "--config",
                                                                  str(config))
    latest = len(pg_migrations.MIGRATIONS)
    assert first.returncode == 0 and f"schema version 0 -> {latest}" in first.stdout, \
        first.stderr
    assert second.returncode == 0 and f"schema version {latest}, up to date" in second.stdout
    copy = cli("copy-ledger", "--from-sqlite", str(tmp_path / "sidecar.db"), "--config",
               str(config))
    assert copy.returncode == 0, copy.stderr
    # 6.75 (r1..r6) + 2 × 2.50 = $11.75
    assert ("8 events read, 8 copied ($11.75), 0 already present, 1 Idempotency-Keys copied"
            in copy.stdout)
    again = cli("copy-ledger", "--from-sqlite", str(tmp_path / "sidecar.db"), "--config",
                str(config))
    assert ("8 events read, 0 copied ($0), 8 already present, 0 Idempotency-Keys copied"
            in again.stdout), again.stderr
    assert count_events(pg_dsn) == 8

    replica = exporter_factory(replica_config(pg_dsn, tmp_path, "sidecar-1", budgets=BUDGETS))
    # The batch retried after the move (its answer was lost, say): a replay, not 8 more.
    retry = replica.post_usage(batch, headers=moved)
    assert retry.json() == {"accepted": 8, "duplicates": 0}
    assert retry.headers["idempotent-replayed"] == "true"
    assert count_events(pg_dsn) == 8
    pg_text = replica.metrics()
    series = {**TEAM, "provider": "openai"}
    for model in ("gpt-4o", "gpt-4o-mini"):
        for name, labels in (("llm_cost_usd_total", {}), ("llm_tokens_total",
                                                           {"token_type": "input"}),
                             ("llm_requests_total", {"outcome": "success"})):
            assert metric_value(pg_text, name, **series, model=model, **labels) == (
                metric_value(sqlite_text, name, **series, model=model, **labels)), (name, model)
    for period in ("daily", "monthly"):
        assert metric_value(pg_text, "llm_budget_spend_usd", **TEAM, period=period) == (
            metric_value(sqlite_text, "llm_budget_spend_usd", **TEAM, period=period)) == (
            pytest.approx(11.75))
    # copy-ledger refuses to write under the name of a replica that is running.
    busy = cli("copy-ledger", "--from-sqlite", str(tmp_path / "sidecar.db"), "--config",
               str(config))
    assert busy.returncode == 1 and "held by another running exporter" in busy.stderr
