"""SQLite ledger: idempotency, atomic batches, running totals that survive a reopen."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
from msgspec.structs import replace

from llm_cost_exporter.commit_queue import (
    INLINE_MAX_EVENTS,
    INLINE_MAX_FLUSH_EVENTS,
    CommitQueue,
)
from llm_cost_exporter.events import (
    Attribution,
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
from llm_cost_exporter.ledger.base import LATENCY_BUCKETS
from llm_cost_exporter.ledger.migrations import MIGRATIONS
from llm_cost_exporter.ledger.sqlite import SQLiteLedger
from llm_cost_exporter.ledger.sqlite_rows import RowInserter

TS = datetime(2026, 3, 14, 12, tzinfo=UTC)


def ev(request_id: str | None, cost: str = "0.5", tokens: int = 100,
       latency: float | None = 1.0, outcome: str = "success") -> PricedEvent:
    event = UsageEvent(Attribution("eng", "app", user="alice"), "openai", "gpt-4o",
                       TokenCounts(input=tokens, output=tokens // 2, reasoning=tokens // 4),
                       TS, outcome=outcome, latency_seconds=latency, request_id=request_id)
    return PricedEvent(event=event, labels=SeriesLabels("eng", "app", "openai", "gpt-4o"),
                       cost=D(cost), price_source="test")


KEY = SeriesKey("eng", "app", "openai", "gpt-4o", "success")


def count_events(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def spied_ledger(path: Path) -> tuple[SQLiteLedger, list[tuple[int, int]]]:
    """A ledger that notes, for each commit, the thread that ran it and its event count."""
    ledger = SQLiteLedger(path)
    commits: list[tuple[int, int]] = []
    record = ledger.record

    def spy(batches, keys=None):  # type: ignore[no-untyped-def]
        commits.append((threading.get_ident(), sum(len(b) for b in batches)))
        return record(batches, keys)

    ledger.record = spy  # type: ignore[method-assign]
    return ledger, commits


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


def test_grouped_totals_match_a_recount_per_label_set_and_outcome(tmp_path: Path) -> None:
    # The writer sums a batch per (labels, outcome) before it touches `totals`: mixed label
    # sets, outcomes, zero-cost and capped ("other") events must land in their own rows.
    ledger = SQLiteLedger(tmp_path / "l.db")
    batch = []
    for i in range(60):
        base = ev(None, cost="0.25" if i % 3 else "0", tokens=10 + i,
                  outcome="error" if i % 3 == 1 else "success")
        sent = f"new-{i}" if i % 5 == 0 else f"app{i % 2}"  # new-* went over the cap
        event = replace(base.event, attribution=Attribution("eng", sent, user="alice"))
        labels = SeriesLabels("eng", "other" if i % 5 == 0 else sent, "openai", "gpt-4o")
        batch.append(PricedEvent(event=event, labels=labels, cost=base.cost,
                                 price_source="test"))
    assert ledger.record([batch]) == [BatchResult(60, 0)]
    with sqlite3.connect(tmp_path / "l.db") as conn:
        recount = {
            SeriesKey(d, p, pr, m, o): (n, tok, D(0) + sum((D(c) for c in costs.split("|")),
                                                           D(0)))
            for d, p, pr, m, o, n, tok, costs in conn.execute(
                "SELECT department, project, provider, model, outcome, COUNT(*), SUM(input),"
                " GROUP_CONCAT(cost_usd, '|') FROM events GROUP BY 1, 2, 3, 4, 5")}
        # The capped events keep their sent project in raw_project; the others store none.
        raw = conn.execute("SELECT COUNT(*) FROM events WHERE raw_project IS NOT NULL"
                           " AND raw_project LIKE 'new-%' AND project = 'other'").fetchone()
        no_raw = conn.execute("SELECT COUNT(*) FROM events WHERE raw_project IS NULL"
                              " AND raw_department IS NULL AND raw_model IS NULL").fetchone()
    totals = ledger.totals().series
    assert {k: (t.requests, t.input, t.cost) for k, t in totals.items()} == recount
    assert len(recount) == 6  # {app0, app1, other} x {success, error}
    # 12 events are "other": i % 5 == 0 for i in 0..59.
    assert sum(t.requests for k, t in totals.items() if k.project == "other") == 12
    assert (raw, no_raw) == ((12,), (48,))
    # 20 events cost 0 (i % 3 == 0) and 40 cost $0.25: 40 x 0.25 = $10.00 in all.
    assert sum(t.cost for t in totals.values()) == D("10.00")


def test_small_batches_commit_on_the_loop_and_large_ones_on_the_writer(tmp_path: Path) -> None:
    ledger, commits = spied_ledger(tmp_path / "l.db")
    queue = CommitQueue(ledger, inline=True)

    async def main() -> tuple[int, list[BatchResult]]:
        small = [ev(f"s{i}") for i in range(INLINE_MAX_EVENTS)]
        large = [ev(f"l{i}") for i in range(INLINE_MAX_EVENTS + 1)]
        return threading.get_ident(), [await queue.record(small), await queue.record(large)]

    loop_thread, results = asyncio.run(main())
    queue.close()
    threads = [thread for thread, _ in commits]
    assert [r.accepted for r in results] == [INLINE_MAX_EVENTS, INLINE_MAX_EVENTS + 1]
    assert threads[0] == loop_thread  # the small batch: committed by the loop itself
    assert threads[1] != loop_thread  # the large one: by the ledger-writer thread
    assert count_events(tmp_path / "l.db") == 2 * INLINE_MAX_EVENTS + 1


@pytest.mark.parametrize("count", [0, 1, 3, 63, 64, 100, 127, 200])
def test_row_inserter_writes_every_row_once_in_order(count: int) -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
    inserter = RowInserter("INSERT INTO t (a, b)", 2)
    inserter.insert(conn, [v for i in range(count) for v in (i, f"row-{i}")])
    assert conn.execute("SELECT a, b FROM t ORDER BY id").fetchall() == [
        (i, f"row-{i}") for i in range(count)]
    with pytest.raises(ValueError, match="do not make rows of 2"):
        inserter.insert(conn, [1, "a", 2])
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (count,)  # nothing added


def test_row_inserter_upsert_applies_a_key_repeated_in_one_statement_twice() -> None:
    # The spend-slot upsert adds to what is stored; a slot split in two rows (the 64-bit
    # guard) must add both, in one statement as in two.
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE s (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    conn.execute("INSERT INTO s VALUES ('a', 1)")
    upsert = RowInserter("INSERT INTO s (k, v)", 2,
                         "ON CONFLICT (k) DO UPDATE SET v = v + excluded.v")
    # 70 rows, in statements of 64, 4 and 2: 'a' twice in the first statement, 'k3' in the
    # first and again in the last.
    flat = ["a", 10, "a", 100] + [v for i in range(67) for v in (f"k{i}", i)] + ["k3", 1000]
    upsert.insert(conn, flat)
    assert conn.execute("SELECT v FROM s WHERE k = 'a'").fetchone() == (1 + 10 + 100,)
    assert conn.execute("SELECT v FROM s WHERE k = 'k3'").fetchone() == (3 + 1000,)
    assert conn.execute("SELECT COUNT(*), SUM(v) FROM s").fetchone() == (
        68, sum(range(67)) + 1 + 10 + 100 + 1000)


def test_row_inserter_stays_under_an_old_sqlite_parameter_limit() -> None:
    # SQLite before 3.32 allowed 999 parameters per statement: 64 rows of 24 would be 1,536.
    conn = sqlite3.connect(":memory:")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    columns = ", ".join(f"c{i}" for i in range(24))
    conn.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY, {columns})")
    RowInserter(f"INSERT INTO t ({columns})", 24).insert(
        conn, [row * 100 + col for row in range(100) for col in range(24)])
    # 999 // 24 = 41 rows at most per statement: 32 + 32 + 32 + 4 here, all 100 in order.
    assert conn.execute("SELECT COUNT(*), MIN(c0), MAX(c23) FROM t").fetchone() == (
        100, 0, 99 * 100 + 23)
    assert [r[0] for r in conn.execute("SELECT c0 FROM t ORDER BY id")] == [
        row * 100 for row in range(100)]


def test_a_burst_of_small_batches_is_committed_in_bounded_steps(tmp_path: Path) -> None:
    ledger, commits = spied_ledger(tmp_path / "l.db")
    queue = CommitQueue(ledger, inline=True)

    async def main() -> list[BatchResult]:
        # 20 batches of 256 queued in one loop iteration: 5,120 events.
        batches = [[ev(f"b{b}-{i}") for i in range(INLINE_MAX_EVENTS)] for b in range(20)]
        return await asyncio.gather(*(queue.record(batch) for batch in batches))

    results = asyncio.run(main())
    queue.close()
    sizes = [events for _, events in commits]
    assert [r.accepted for r in results] == [INLINE_MAX_EVENTS] * 20
    assert max(sizes) <= INLINE_MAX_FLUSH_EVENTS  # never one long stall of 5,120
    assert sum(sizes) == 20 * INLINE_MAX_EVENTS  # every batch once
    assert len(sizes) == 20 * INLINE_MAX_EVENTS // INLINE_MAX_FLUSH_EVENTS  # 1,024 = 4 x 256
    assert count_events(tmp_path / "l.db") == 20 * INLINE_MAX_EVENTS


def test_a_cancelled_caller_does_not_stop_the_writer_thread(tmp_path: Path) -> None:
    # A request that goes away while its batch waits for the writer (client gone, shutdown):
    # setting the result of its cancelled future used to raise in the writer thread, which
    # died, and every later batch for the thread then waited forever.
    ledger = SQLiteLedger(tmp_path / "l.db")
    queue = CommitQueue(ledger, inline=True)
    size = INLINE_MAX_EVENTS + 1  # a batch for the writer thread

    async def main() -> BatchResult:
        with ledger._write_lock:  # the writer is busy with an earlier commit
            gone = asyncio.create_task(queue.record([ev(f"a{i}") for i in range(size)]))
            await asyncio.sleep(0.05)
            gone.cancel()
            await asyncio.sleep(0.05)
        return await asyncio.wait_for(queue.record([ev(f"b{i}") for i in range(size)]), 10)

    result = asyncio.run(main())
    queue.close()
    assert result.accepted == size
    # The cancelled caller's batch was committed too (as on the inline path): 2 x 257.
    assert count_events(tmp_path / "l.db") == 2 * size


def test_close_commits_inline_batches_left_between_flush_steps(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    queue = CommitQueue(ledger, inline=True)

    async def main() -> tuple[int, int, list[BatchResult]]:
        tasks = [asyncio.create_task(queue.record([ev(f"c{b}-{i}") for i in
                                                   range(INLINE_MAX_EVENTS)]))
                 for b in range(40)]
        await asyncio.sleep(0)  # the tasks queue their batches
        await asyncio.sleep(0)  # one flush step: 1,024 of the 10,240 events
        before = count_events(tmp_path / "l.db")
        queue.close()  # what the app's shutdown does: the other 9,216 are committed now,
        after = count_events(tmp_path / "l.db")  # not in later loop iterations
        return before, after, await asyncio.gather(*tasks)

    before, after, results = asyncio.run(main())
    assert (before, after) == (1024, 40 * INLINE_MAX_EVENTS)
    assert [r.accepted for r in results] == [INLINE_MAX_EVENTS] * 40
    assert not queue._pending and not queue._flush_scheduled


def test_row_inserter_refuses_when_not_one_row_fits() -> None:
    conn = sqlite3.connect(":memory:")
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 2)
    conn.execute("CREATE TABLE t (a, b, c)")
    with pytest.raises(sqlite3.OperationalError, match="too many SQL variables"):
        RowInserter("INSERT INTO t (a, b, c)", 3).insert(conn, [1, 2, 3])
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
    RowInserter("INSERT INTO t (a, b, c)", 3).insert(conn, [])  # nothing to insert: fine


def test_a_zero_cost_leaves_the_stored_sum_as_it_was(tmp_path: Path) -> None:
    # 1.5 + a call priced at "0.00": the stored total is "1.5" (the value alone would allow
    # "1.50", which the ledger wrote for a while).
    ledger = SQLiteLedger(tmp_path / "l.db")
    ledger.record([[ev("a", cost="1.5"), ev("b", cost="0.00")]])
    ledger.close()
    with sqlite3.connect(tmp_path / "l.db") as conn:
        assert conn.execute("SELECT cost_usd FROM totals").fetchall() == [("1.5",)]


def test_a_slot_sum_past_a_row_limit_is_kept_exact(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    # Two calls of 4,000,000.000000000001 USD in one 15-minute slot: each is 4e18 + 1
    # pico-USD, under the 2^62 ≈ 4.61e18 one row may take; their sum 8e18 + 2 is not, so
    # the slot is written in two rows that SQLite adds (exactly: below 2^63 ≈ 9.22e18).
    big = "4000000.000000000001"
    [result] = ledger.record([[ev(f"b{i}", cost=big) for i in range(2)]])
    assert result == BatchResult(2, 0)
    # 2 × 4,000,000.000000000001 = 8,000,000.000000000002 exactly
    assert ledger.spend("eng", "app", TS.replace(hour=0), TS.replace(hour=23)) == \
        D("8000000.000000000002")
    assert ledger.totals().series[KEY].cost == D("8000000.000000000002")
    ledger.close()


def test_label_sets_of_one_series_add_up(tmp_path: Path) -> None:
    """Events of one series but different label sets (users, price sources) fold into the
    same totals, latency histogram and spend as one set would."""
    ledger = SQLiteLedger(tmp_path / "l.db")

    def by(user: str, source: str, cost: str, latency: float) -> PricedEvent:
        base = ev(None, cost=cost, latency=latency)
        event = replace(base.event, attribution=Attribution("eng", "app", user))
        return replace(base, event=event, price_source=source)

    batch = [by("alice", "a", "0.25", 0.2), by("bob", "a", "0.5", 3.0),
             by("alice", "b", "0", 0.2), by("carol", "b", "0.125", 0.2)]
    assert ledger.record([batch]) == [BatchResult(4, 0)]
    totals = ledger.totals()
    series = totals.series[KEY]
    # 4 requests × 100 input tokens; 0.25 + 0.5 + 0 + 0.125 = 0.875 USD
    assert (series.requests, series.input, series.cost) == (4, 400, D("0.875"))
    latency = totals.latency[("openai", "gpt-4o")]
    # 0.2 s three times (bucket 0.25), 3.0 s once (bucket 5.0); 0.2×3 + 3.0 = 3.6 s
    assert (latency.count, round(latency.total, 9)) == (4, 3.6)
    assert latency.counts[LATENCY_BUCKETS.index(0.25)] == 3
    assert latency.counts[LATENCY_BUCKETS.index(5.0)] == 1
    assert ledger.spend("eng", "app", TS.replace(hour=0), TS.replace(hour=23)) == D("0.875")
    ledger.close()
