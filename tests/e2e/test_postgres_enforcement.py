"""Budget enforcement by two proxy replicas sharing one PostgreSQL ledger.

Every call to the fake provider costs $0.00808 with gpt-4o at list price (prompt 2000 of
which 1536 cached, completion 500): 464 × 2.50/M + 1536 × 1.25/M + 500 × 10/M. The enforced
daily budget is $0.02: two calls ($0.01616) stay under it, the third ($0.02424) crosses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ExporterProcess, metric_value, wait_until
from fixtures.fake_provider import FakeProvider
from helpers.postgres import replica_config

CALL = 0.00808
REFRESH = 0.5  # proxy.budget_refresh_seconds of both replicas
TEAM = {"X-LLM-Department": "engineering", "X-LLM-Project": "ai-features"}


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


def call(replica: ExporterProcess) -> int:
    return httpx.post(f"{replica.url}/openai/v1/chat/completions", headers=TEAM, timeout=20,
                      json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
                      ).status_code


def test_a_budget_crossed_on_one_replica_blocks_the_other_within_the_refresh_interval(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider, pg_dsn: str,
        tmp_path: Path) -> None:
    extra = {"upstreams": [{"name": "openai", "base_url": fake.url, "format": "openai"}],
             "proxy": {"budget_refresh_seconds": REFRESH},
             "budgets": [{"department": "engineering", "project": "ai-features",
                          "daily_usd": 0.02, "enforce": True}]}
    a = exporter_factory(replica_config(pg_dsn, tmp_path, "proxy-a", **extra))
    b = exporter_factory(replica_config(pg_dsn, tmp_path, "proxy-b", **extra))
    assert call(a) == 200 and call(a) == 200  # $0.01616 through a
    # b reads the shared spend ($0.01616 < $0.02) and lets its first call through: $0.02424.
    assert call(b) == 200
    crossed = time.monotonic()
    # The replica that crossed the limit blocks its very next call (its own commits count
    # at once).
    assert call(b) == 429
    # a learns b's spend with its next refresh: it may let calls through until then, never
    # one that starts more than one refresh interval (plus the call that triggers that
    # refresh in the background) after the crossing.
    passed: list[float] = []

    def a_blocks() -> bool:
        started = time.monotonic()
        if call(a) == 429:
            return True
        passed.append(started - crossed)
        return False

    wait_until(a_blocks, 10, "replica a to block")
    assert all(t < REFRESH + 0.5 for t in passed), passed
    assert len(fake.received) == 3 + len(passed)  # a blocked call never reaches upstream
    # Both replicas export the same (shared) spend: the calls that went through, exactly.
    spend = (3 + len(passed)) * CALL
    for replica in (a, b):
        assert metric_value(replica.metrics(), "llm_budget_spend_usd", department="engineering",
                            project="ai-features", period="daily") == pytest.approx(spend)
