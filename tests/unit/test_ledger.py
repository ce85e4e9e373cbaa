"""SQLite ledger: idempotency, atomic batches, running totals that survive a reopen."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest

from llm_cost_exporter.commit_queue import CommitQueue
from llm_cost_exporter.events import (
    Attribution,
    Cost,
    PricedEvent,
    SeriesLabels,
    TokenCounts,
    UsageEvent,
)
from llm_cost_exporter.ledger import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LedgerUnavailable,
    SeriesKey,
)
from llm_cost_exporter.ledger.migrations import MIGRATIONS
from llm_cost_exporter.ledger.sqlite import SQLiteLedger

TS = datetime(2026, 3, 14, 12, tzinfo=UTC)


def ev(request_id: str | None, cost: str = "0.5", tokens: int = 100,
       latency: float | None = 1.0, outcome: str = "success") -> PricedEvent:
    event = UsageEvent(Attribution("eng", "app", user="alice"), "openai", "gpt-4o",
                       TokenCounts(input=tokens, output=tokens // 2, reasoning=tokens // 4),
                       TS, outcome=outcome, latency_seconds=latency, request_id=request_id)
    return PricedEvent(event=event, labels=SeriesLabels("eng", "app", "openai", "gpt-4o"),
                       cost=Cost(input=D(cost)), price_source="test")


KEY = SeriesKey("eng", "app", "openai", "gpt-4o", "success")


def count_events(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def test_retry_with_same_request_id_is_counted_once(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    assert ledger.record([[ev("r-1"), ev("r-2")]]) == [BatchResult(2, 0)]
    assert ledger.record([[ev("r-1"), ev("r-2"), ev("r-3")]]) == [BatchResult(1, 2)]
    # Events without a request id cannot be deduplicated: each one counts.
    assert ledger.record([[ev(None), ev(None)]]) == [BatchResult(2, 0)]
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.input, totals.cost) == (5, 500, D("2.5"))
    assert count_events(tmp_path / "l.db") == 5


def test_duplicate_inside_one_commit_from_two_batches(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    assert ledger.record([[ev("a")], [ev("a"), ev("b")]]) == [BatchResult(1, 0), BatchResult(1, 1)]
    assert ledger.totals().series[KEY].requests == 2


def test_failing_batch_writes_nothing_and_spares_its_neighbours(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    bad = ev(["not", "bindable"])  # type: ignore[arg-type]  # sqlite cannot bind a list
    results = ledger.record([[ev("ok-1")], [ev("x-1"), bad], [ev("ok-2")]])
    assert results[0] == BatchResult(1, 0) and results[2] == BatchResult(1, 0)
    assert isinstance(results[1], LedgerUnavailable)
    totals = ledger.totals().series[KEY]
    # x-1 was rolled back with its batch: 2 requests, 200 input tokens, $1.00.
    assert (totals.requests, totals.input, totals.cost) == (2, 200, D("1.0"))
    assert count_events(tmp_path / "l.db") == 2


def test_idempotency_key_replays_conflicts_and_survives_reopen(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    k1, k1_other = BatchKey("k1", b"digest-a"), BatchKey("k1", b"digest-b")
    # Events without request ids: only the key can tell a retry from new usage.
    assert ledger.lookup_key(k1) is None
    assert ledger.record([[ev(None), ev(None)]], [k1]) == [BatchResult(2, 0)]
    assert ledger.lookup_key(k1) == BatchResult(2, 0, replayed=True)
    assert isinstance(ledger.lookup_key(k1_other), IdempotencyConflict)
    assert ledger.record([[ev(None), ev(None)]], [k1]) == [BatchResult(2, 0, replayed=True)]
    [conflict] = ledger.record([[ev(None)]], [k1_other])
    assert isinstance(conflict, IdempotencyConflict)
    ledger.close()
    ledger = SQLiteLedger(tmp_path / "l.db")
    assert ledger.record([[ev(None), ev(None)]], [k1]) == [BatchResult(2, 0, replayed=True)]
    totals = ledger.totals().series[KEY]
    # Only the first batch counted: 2 requests x 100 input tokens, 2 x $0.5.
    assert (totals.requests, totals.input, totals.cost) == (2, 200, D("1.0"))
    assert ledger.spend("eng", None, TS.replace(hour=0), TS.replace(hour=23)) == D("1.0")
    assert count_events(tmp_path / "l.db") == 2


def test_idempotency_key_inside_one_commit_and_after_a_failed_batch(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    bad = ev(["not", "bindable"])  # type: ignore[arg-type]  # sqlite cannot bind a list
    k, failed = BatchKey("k", b"d"), BatchKey("f", b"d")
    results = ledger.record([[ev("a"), ev("b")], [ev("a"), ev("b")], [ev("c"), bad], [ev("x")]],
                            [k, k, failed, BatchKey("k", b"other")])
    # The repeat within the commit replays the first batch's counts, not its own (0, 2).
    assert results[:2] == [BatchResult(2, 0), BatchResult(2, 0, replayed=True)]
    assert isinstance(results[2], LedgerUnavailable)
    assert isinstance(results[3], IdempotencyConflict)
    # The failed batch took its key with it: the fixed batch under the same key is new.
    assert ledger.record([[ev("c")]], [failed]) == [BatchResult(1, 0)]
    assert ledger.totals().series[KEY].requests == 3
    assert count_events(tmp_path / "l.db") == 3


def test_totals_and_latency_survive_reopen(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    ledger.record([[ev("a", latency=0.2), ev("b", latency=3.0), ev("c", latency=None,
                                                                     outcome="error")]])
    before = ledger.totals()
    ledger.close()
    after = SQLiteLedger(tmp_path / "l.db").totals()
    assert after == before
    lat = after.latency[("openai", "gpt-4o")]
    # 0.2 falls in le=0.25 (index 1), 3.0 in le=5 (index 5); the error had no latency.
    assert (lat.count, lat.counts[1], lat.counts[5], lat.total) == (2, 1, 1, pytest.approx(3.2))
    assert after.series[KEY._replace(outcome="error")].requests == 1


def test_running_totals_match_a_recount_of_events(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    for i in range(20):
        ledger.record([[ev(f"r{i}-{j}", cost="0.001", tokens=i + j) for j in range(5)]])
    with sqlite3.connect(tmp_path / "l.db") as conn:
        n, tokens = conn.execute("SELECT COUNT(*), SUM(input) FROM events").fetchone()
        costs = [D(c) for (c,) in conn.execute("SELECT cost_usd FROM events")]
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.input, totals.cost) == (n, tokens, sum(costs))
    assert totals.cost == D("0.100")  # 100 events × $0.001, exactly


def test_schema_is_versioned_and_newer_schema_is_refused(tmp_path: Path) -> None:
    SQLiteLedger(tmp_path / "l.db").close()
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == len(
            MIGRATIONS)
        conn.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(RuntimeError, match="newer than this exporter"):
        SQLiteLedger(tmp_path / "l.db")


def test_group_commit_answers_every_caller_after_commit(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    queue = CommitQueue(ledger)
    # Hold the writer inside its first commit while 200 callers queue up behind it.
    with ledger._write_lock:
        futures = [queue.submit([ev(f"g{i}")]) for i in range(200)]
        assert not any(f.done() for f in futures)  # nobody is answered before a commit
    results = [f.result(10) for f in futures]
    queue.close()
    assert results == [BatchResult(1, 0)] * 200
    assert count_events(tmp_path / "l.db") == 200
    # The first commit took one batch (or all); the rest shared the next one.
    assert queue.commits <= 2


def test_wal_stays_bounded_under_writes_that_never_pause(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the writer's own checkpoint past the limit, a WAL under steady writes never
    # restarts: random request_ids dirty one 4 KiB page each, so this loop alone would
    # leave a WAL of about 30 batches x 400 events x 4 KiB = 48 MiB.
    import random

    from llm_cost_exporter.ledger import sqlite_wal

    limit = 2 * 1024 * 1024
    monkeypatch.setattr(sqlite_wal, "WAL_LIMIT_BYTES", limit)
    ledger = SQLiteLedger(tmp_path / "l.db")
    wal = tmp_path / "l.db-wal"
    sizes = []
    for b in range(30):
        batch = [ev(f"{random.getrandbits(64):016x}-{b}-{i}") for i in range(400)]
        assert ledger.record([batch]) == [BatchResult(400, 0)]
        sizes.append(wal.stat().st_size)
    # One commit past the limit at most (400 events x 4 KiB pages plus the tree above them).
    assert max(sizes) < limit + 4 * 1024 * 1024, sizes
    assert ledger.totals().series[KEY].requests == 12_000
    ledger.close()
    assert count_events(tmp_path / "l.db") == 12_000
