"""PostgreSQL ledger against a real server: the SQLite ledger's guarantees, across replicas.

Two PostgresLedger objects with different instance names on one database stand for two
exporter replicas.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import psycopg
import pytest
from msgspec.structs import replace

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
    LedgerRejected,
    LedgerUnavailable,
    SeriesKey,
    pg_migrations,
)
from llm_cost_exporter.ledger.pg_instance import InstanceInUse
from llm_cost_exporter.ledger.postgres import PostgresLedger

from helpers.postgres import PgServer

TS = datetime(2026, 3, 14, 12, tzinfo=UTC)
KEY = SeriesKey("eng", "app", "openai", "gpt-4o", "success")
MARCH = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))


def record_behind(other: psycopg.Connection[Any], other_commits: bool,
                  record: Callable[[], list[Any]]) -> list[Any]:
    """Run `record` while `other` holds an open transaction it must wait for (it is still
    waiting after 1 s), then end that transaction (commit or roll back) and return what
    `record` returned."""
    results: list[Any] = []
    writer = threading.Thread(target=lambda: results.extend(record()))
    writer.start()
    writer.join(1.0)
    assert writer.is_alive(), "the write should wait for the open transaction"
    if other_commits:
        other.commit()
    else:
        other.rollback()
    writer.join(10)
    return results


def ev(request_id: str | None, cost: str = "0.5", tokens: int = 100,
       latency: float | None = 1.0, project: str = "app") -> PricedEvent:
    event = UsageEvent(Attribution("eng", project, user="alice"), "openai", "gpt-4o",
                       TokenCounts(input=tokens, output=tokens // 2, reasoning=tokens // 4),
                       TS, latency_seconds=latency, request_id=request_id)
    return PricedEvent(event=event, labels=SeriesLabels("eng", project, "openai", "gpt-4o"),
                       cost=D(cost), price_source="test")


def scalar(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


@pytest.fixture
def ledgers(pg_dsn: str):  # type: ignore[no-untyped-def]
    opened: list[PostgresLedger] = []

    def open_(instance: str, **kwargs: object) -> PostgresLedger:
        ledger = PostgresLedger(pg_dsn, instance, **kwargs)  # type: ignore[arg-type]
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        ledger.close()


def test_retry_with_same_request_id_is_counted_once(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    assert ledger.record([[ev("r-1"), ev("r-2")]]) == [BatchResult(2, 0)]
    assert ledger.record([[ev("r-1"), ev("r-2"), ev("r-3")]]) == [BatchResult(1, 2)]
    assert ledger.record([[ev(None), ev(None)]]) == [BatchResult(2, 0)]
    # Inside one commit: a request_id repeated in a batch or across batches counts once.
    assert ledger.record([[ev("x")], [ev("x"), ev("y"), ev("y")]]) == [
        BatchResult(1, 0), BatchResult(1, 2)]
    totals = ledger.totals().series[KEY]
    # 7 events × 100 input tokens, 7 × $0.50 = $3.50.
    assert (totals.requests, totals.input, totals.cost) == (7, 700, D("3.5"))
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 7


def test_failing_batch_writes_nothing_and_spares_its_neighbours(ledgers) -> None:
    ledger = ledgers("a")
    good = ev("x-1")
    # 10^20 input tokens do not fit a BIGINT: the database refuses that batch only.
    bad = replace(good, event=replace(good.event, request_id="x-2",
                                      tokens=TokenCounts(input=10**20)))
    results = ledger.record([[ev("ok-1")], [good, bad], [ev("ok-2")]])
    assert results[0] == BatchResult(1, 0) and results[2] == BatchResult(1, 0)
    assert isinstance(results[1], LedgerUnavailable)
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.cost) == (2, D("1.0"))  # x-1 went with its batch
    # x-1 was rolled back, so it is new when sent again.
    assert ledger.record([[ev("x-1")]]) == [BatchResult(1, 0)]
    # A string PostgreSQL cannot take (a lone surrogate) also fails its own batch only.
    results = ledger.record([[ev("ok-3")], [ev("bad-\ud800")]])
    assert results[0] == BatchResult(1, 0) and isinstance(results[1], LedgerUnavailable)


def test_totals_are_per_replica_and_spend_is_shared(ledgers, pg_dsn: str) -> None:
    a, b = ledgers("replica-a"), ledgers("replica-b")
    a.record([[ev("a1", cost="0.001", latency=0.2), ev("a2", cost="0.002", latency=3.0)]])
    b.record([[ev("b1", cost="0.004"), ev("a1", cost="0.001")]])  # a1 again: a duplicate
    assert a.totals().series[KEY].requests == 2 and b.totals().series[KEY].requests == 1
    # Budget spend is that of both replicas: 0.001 + 0.002 + 0.004 = $0.007, read by either.
    assert a.spend("eng", None, *MARCH) == b.spend("eng", "app", *MARCH) == D("0.007")
    before = a.totals()
    a.close()
    reopened = ledgers("replica-a")
    # Only its own rows are loaded: the counters continue where they were.
    assert reopened.totals() == before
    lat = reopened.totals().latency[("openai", "gpt-4o")]
    assert (lat.count, lat.counts[1], lat.counts[5], lat.total) == (2, 1, 1, pytest.approx(3.2))
    assert scalar(pg_dsn, "SELECT SUM(requests) FROM totals") == 3


def test_money_stays_exact(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    for i in range(10):
        ledger.record([[ev(f"m{i}-{j}", cost="0.001") for j in range(10)]])
    assert ledger.totals().series[KEY].cost == D("0.100")  # 100 × $0.001, not 0.1000000001
    assert scalar(pg_dsn, "SELECT SUM(cost_usd) FROM events") == D("0.100")
    assert scalar(pg_dsn, "SELECT cost_usd FROM totals") == D("0.100")
    assert ledger.spend("eng", "app", *MARCH) == D("0.1")


def test_racing_replicas_count_every_request_id_once(ledgers, pg_dsn: str) -> None:
    a, b = ledgers("a"), ledgers("b")
    ids = [f"race-{i}" for i in range(300)]

    def send(ledger: PostgresLedger, order: list[str]) -> int:
        accepted = 0
        for start in range(0, len(order), 30):
            [result] = ledger.record([[ev(i, cost="0.01") for i in order[start:start + 30]]])
            assert isinstance(result, BatchResult)
            accepted += result.accepted
        return accepted

    # Both replicas get all 300 ids at once, in opposite orders.
    with ThreadPoolExecutor(2) as pool:
        got = [pool.submit(send, a, ids), pool.submit(send, b, ids[::-1])]
        accepted = [f.result(60) for f in got]
    assert sum(accepted) == 300
    counted = a.totals().series[KEY].requests + b.totals().series[KEY].requests
    assert counted == 300 == scalar(pg_dsn, "SELECT COUNT(*) FROM events")
    assert a.spend("eng", "app", *MARCH) == D("3.00")  # 300 × $0.01, once each


@pytest.mark.parametrize("other_commits", [True, False])
def test_insert_waits_for_the_other_transaction_with_the_same_id(
        ledgers, pg_dsn: str, other_commits: bool) -> None:
    ledger = ledgers("a")
    ledger.record([[ev("warm-up")]])
    with psycopg.connect(pg_dsn) as other:  # another replica, mid-commit
        other.execute(
            "INSERT INTO events (request_id, ts, instance, department, project, provider, "
            "model, outcome, input, cache_read, cache_write, cache_write_1h, output, "
            "reasoning, cost_usd, priced, price_source, source) VALUES ('same', now(), 'b', "
            "'eng', 'app', 'openai', 'gpt-4o', 'success', 1, 0, 0, 0, 0, 0, 0.5, true, 't', "
            "'ingest')")
        results = record_behind(other, other_commits, lambda: ledger.record([[ev("same")]]))
    # Committed elsewhere: a duplicate here. Rolled back there: new here. Never both or none.
    assert results == [BatchResult(0, 1) if other_commits else BatchResult(1, 0)]
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events WHERE request_id = 'same'") == 1


def test_an_instance_name_is_held_by_one_process(ledgers) -> None:
    ledgers("only-one")
    with pytest.raises(InstanceInUse, match="held by another running exporter"):
        ledgers("only-one", start_timeout=1.0)


def test_broken_connections_are_replaced(ledgers, pg: PgServer, pg_dsn: str) -> None:
    ledger = ledgers("a")
    ledger.record([[ev("before")]])
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    with pg.admin() as admin:  # what a database restart does to every session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
    ledger.check()  # re-claims the instance name on a new session
    assert ledger.record([[ev("after")]]) == [BatchResult(1, 0)]
    assert ledger.totals().series[KEY].requests == 2
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 2


def test_migrations_are_versioned_idempotent_and_refuse_newer(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert pg_migrations.migrate(conn) == (0, len(pg_migrations.MIGRATIONS))
        assert pg_migrations.migrate(conn) == (len(pg_migrations.MIGRATIONS),) * 2
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                     (len(pg_migrations.MIGRATIONS) + 1,))
        with pytest.raises(RuntimeError, match="newer than this exporter"):
            pg_migrations.migrate(conn)


def test_copy_from_sqlite_gives_the_same_totals_and_spend(ledgers, tmp_path: Path,
                                                          pg_dsn: str) -> None:
    from llm_cost_exporter.ledger.pg_copy import copy_sqlite_ledger
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger

    source = SQLiteLedger(tmp_path / "sidecar.db")
    other = ev("o-1", cost="0.25", project="other")
    other = replace(other, event=replace(other.event, attribution=Attribution(
        "eng", "capped-project", user=None)))  # exported as "other": the raw value is kept
    source.record([[ev("s-1", cost="0.001"), ev(None, cost="0.002"), ev(None, cost="0.002"),
                    ev("s-2", cost="0.004", latency=None), other]])
    sqlite_totals = source.totals()
    source.close()
    ledger = ledgers("sidecar")
    report = copy_sqlite_ledger(tmp_path / "sidecar.db", ledger)
    assert (report.read, report.copied, report.already_present) == (5, 5, 0)
    assert report.cost_copied == D("0.259")  # 0.001 + 0.002 + 0.002 + 0.004 + 0.25
    assert ledger.totals() == sqlite_totals
    assert ledger.spend("eng", None, *MARCH) == D("0.259")
    assert ledger.spend("eng", "other", *MARCH) == D("0.25")
    # Again: nothing new, not even the two identical events that had no request_id.
    again = copy_sqlite_ledger(tmp_path / "sidecar.db", ledger)
    assert (again.copied, again.already_present) == (0, 5)
    assert ledger.totals() == sqlite_totals
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 5
    assert scalar(pg_dsn, "SELECT raw_project FROM events WHERE project = 'other'") == (
        "capped-project")


def test_the_largest_event_ingest_accepts_fits(ledgers) -> None:
    ledger = ledgers("a")
    # 10^12 output tokens (ingest's maximum) at $10/M = $10,000,000: 10^19 pico-USD in one
    # spend slot, more than a BIGINT holds; the slots are NUMERIC.
    huge = ev("huge", cost="10000000")
    huge = replace(huge, event=replace(huge.event, tokens=TokenCounts(output=10**12)))
    assert ledger.record([[huge], [huge]]) == [BatchResult(1, 0), BatchResult(0, 1)]
    assert ledger.spend("eng", "app", *MARCH) == D(10_000_000)
    assert ledger.totals().series[KEY].output == 10**12


# -- Idempotency-Keys ------------------------------------------------------------------------
# Most keyed batches below carry events without request_id: without the key, a retry of
# them would be counted again, so every count shows what the key did.


def test_a_retry_with_the_same_key_and_body_is_a_replay(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    key = BatchKey("order-42", b"body-1")
    assert ledger.lookup_key(key) is None
    assert ledger.record([[ev(None), ev(None)]], [key]) == [BatchResult(2, 0)]
    # What the API asks before it parses a body again; any replica answers it.
    assert ledgers("b").lookup_key(key) == BatchResult(2, 0, replayed=True)
    assert isinstance(ledger.lookup_key(BatchKey("order-42", b"body-2")), IdempotencyConflict)
    again = ledger.record([[ev(None), ev(None)]], [key])
    assert again == [BatchResult(2, 0, replayed=True)]
    assert isinstance(again[0], BatchResult) and again[0].written == ()
    # Nothing of the replay was counted: 2 events × 100 input tokens, 2 × $0.50.
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.input, totals.cost) == (2, 200, D("1.0"))
    assert ledger.spend("eng", None, *MARCH) == D("1.0")
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 2
    assert scalar(pg_dsn, "SELECT SUM(requests) FROM totals") == 2
    # The first result is replayed as it was, duplicates included (r-1 twice: 2 new, 1 dup).
    dup_key = BatchKey("order-43", b"body-2")
    batch = [ev("r-1"), ev("r-1"), ev(None)]
    assert ledger.record([batch], [dup_key]) == [BatchResult(2, 1)]
    assert ledger.record([batch], [dup_key]) == [BatchResult(2, 1, replayed=True)]
    # Keys are stored: still a replay after a restart.
    ledger.close()
    reopened = ledgers("a")
    assert reopened.record([[ev(None), ev(None)]], [key]) == [BatchResult(2, 0, replayed=True)]
    assert reopened.totals().series[KEY].requests == 4
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 4
    assert scalar(pg_dsn, "SELECT string_agg(concat_ws(' ', key, accepted, duplicates, "
                          "instance), ', ' ORDER BY key) FROM ingest_keys") == (
        "order-42 2 0 a, order-43 2 1 a")
    # keys: one per batch (None = no key), or None.
    assert reopened.record([[ev(None)]], [None]) == [BatchResult(1, 0)]
    with pytest.raises(ValueError, match="one entry per batch"):
        reopened.record([[ev(None)], [ev(None)]], [key])


def test_the_same_key_with_another_body_is_a_conflict(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    assert ledger.record([[ev("c-1")]], [BatchKey("key-7f3a", b"body-1")]) == [
        BatchResult(1, 0)]
    results = ledger.record([[ev("c-2"), ev(None)], [ev("c-2")]],
                            [BatchKey("key-7f3a", b"body-2"), None])
    assert isinstance(results[0], IdempotencyConflict)
    assert isinstance(results[0], LedgerRejected)
    assert str(results[0]) == "Idempotency-Key was already used for a different body"
    # The conflicting batch wrote nothing, so c-2 is new in the next batch of the commit.
    assert results[1] == BatchResult(1, 0)
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.cost) == (2, D("1.0"))
    assert ledger.spend("eng", None, *MARCH) == D("1.0")
    assert scalar(pg_dsn, "SELECT string_agg(request_id, ',' ORDER BY request_id) "
                          "FROM events") == "c-1,c-2"
    # The key keeps its first body and result.
    assert scalar(pg_dsn, "SELECT digest FROM ingest_keys") == b"body-1"
    assert ledger.record([[ev("c-1")]], [BatchKey("key-7f3a", b"body-1")]) == [
        BatchResult(1, 0, replayed=True)]


def test_a_key_is_shared_by_all_replicas(ledgers, pg_dsn: str) -> None:
    a, b = ledgers("replica-a"), ledgers("replica-b")
    key = BatchKey("sent-twice", b"body")
    batch = [ev(None, cost="0.25"), ev(None, cost="0.25")]
    assert a.record([batch], [key]) == [BatchResult(2, 0)]
    # The client's retry reaches the other replica: a replay, counted by neither again.
    assert b.record([batch], [key]) == [BatchResult(2, 0, replayed=True)]
    assert a.totals().series[KEY].requests == 2
    assert KEY not in b.totals().series
    assert a.spend("eng", None, *MARCH) == b.spend("eng", "app", *MARCH) == D("0.50")
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 2
    assert scalar(pg_dsn, "SELECT instance FROM ingest_keys") == "replica-a"
    [conflict] = b.record([batch], [BatchKey("sent-twice", b"another body")])
    assert isinstance(conflict, IdempotencyConflict)


def test_racing_replicas_record_each_key_once(ledgers, pg_dsn: str) -> None:
    a, b = ledgers("a"), ledgers("b")
    keys = [BatchKey(f"race-{i}", b"same body") for i in range(40)]

    def send(ledger: PostgresLedger, order: list[BatchKey]) -> list[BatchResult | Exception]:
        return [result for key in order
                for result in ledger.record([[ev(None, cost="0.01"), ev(None, cost="0.01")]],
                                            [key])]

    # Both replicas get every keyed batch at once, in opposite orders.
    with ThreadPoolExecutor(2) as pool:
        got = [pool.submit(send, a, keys), pool.submit(send, b, keys[::-1])]
        results = [r for f in got for r in f.result(60)]
    batch_results = [r for r in results if isinstance(r, BatchResult)]
    assert len(batch_results) == len(results) == 80
    assert {(r.accepted, r.duplicates) for r in batch_results} == {(2, 0)}
    assert sum(not r.replayed for r in batch_results) == 40  # each key written once
    counted = a.totals().series[KEY].requests + b.totals().series[KEY].requests
    assert counted == 80 == scalar(pg_dsn, "SELECT COUNT(*) FROM events")
    assert a.spend("eng", "app", *MARCH) == D("0.80")  # 40 batches × 2 × $0.01, once each


def test_a_key_repeated_in_one_commit(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    key = BatchKey("twice", b"body")
    batch = [ev("t-1"), ev("t-1"), ev(None)]
    results = ledger.record([batch, batch, [ev(None)]],
                            [key, key, BatchKey("twice", b"other body")])
    # Without the key the second batch would be BatchResult(1, 2); it replays the first.
    assert results[:2] == [BatchResult(2, 1), BatchResult(2, 1, replayed=True)]
    assert isinstance(results[2], IdempotencyConflict)
    assert ledger.totals().series[KEY].requests == 2
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 2
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM ingest_keys") == 1


def test_a_failing_batch_releases_its_key(ledgers, pg_dsn: str) -> None:
    ledger = ledgers("a")
    good = ev("f-1")
    bad = replace(good, event=replace(good.event, request_id="f-2",
                                      tokens=TokenCounts(input=10**20)))  # not a BIGINT
    key = BatchKey("fix-and-retry", b"bad body")
    [failed] = ledger.record([[good, bad]], [key])
    assert isinstance(failed, LedgerUnavailable)
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM ingest_keys") == 0
    # In one commit too: the next batch with that key (the fixed body) is new, not a replay.
    fixed = BatchKey("fix-and-retry", b"fixed body")
    results = ledger.record([[good, bad], [good, ev("f-3")]], [key, fixed])
    assert isinstance(results[0], LedgerUnavailable) and results[1] == BatchResult(2, 0)
    assert ledger.record([[good, ev("f-3")]], [fixed]) == [BatchResult(2, 0, replayed=True)]
    totals = ledger.totals().series[KEY]
    assert (totals.requests, totals.cost) == (2, D("1.0"))
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events") == 2
    assert scalar(pg_dsn, "SELECT digest FROM ingest_keys") == b"fixed body"


@pytest.mark.parametrize("other_commits", [True, False])
def test_a_key_claimed_by_another_open_transaction_waits_for_it(
        ledgers, pg_dsn: str, other_commits: bool) -> None:
    ledger = ledgers("a")
    ledger.record([[ev("warm-up")]])
    with psycopg.connect(pg_dsn) as other:  # another replica, mid-commit with the same key
        other.execute("INSERT INTO ingest_keys (key, digest, accepted, duplicates, instance) "
                      "VALUES ('in-flight', %s, 3, 1, 'b')", (b"body",))
        results = record_behind(other, other_commits, lambda: ledger.record(
            [[ev(None), ev(None)]], [BatchKey("in-flight", b"body")]))
    # Committed there: a replay of its result here. Rolled back there: new here.
    assert results == [BatchResult(3, 1, replayed=True) if other_commits else BatchResult(2, 0)]
    assert scalar(pg_dsn, "SELECT COUNT(*) FROM events WHERE request_id IS NULL") == (
        0 if other_commits else 2)
    assert scalar(pg_dsn, "SELECT accepted FROM ingest_keys") == (3 if other_commits else 2)


def test_migration_2_adds_ingest_keys_to_a_version_1_ledger(
        ledgers, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:  # the exporter before keys: schema version 1
        patch.setattr(pg_migrations, "MIGRATIONS", pg_migrations.MIGRATIONS[:1])
        old = ledgers("a")
        assert old.schema_version == 1
        assert old.record([[ev("v1")]]) == [BatchResult(1, 0)]
        old.close()
    assert scalar(pg_dsn, "SELECT to_regclass('ingest_keys') IS NULL") is True
    upgraded = ledgers("a")
    assert upgraded.schema_version == 2 == len(pg_migrations.MIGRATIONS)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'ingest_keys' ORDER BY ordinal_position").fetchall() == [
            ("key", "text", "NO"), ("digest", "bytea", "NO"), ("accepted", "bigint", "NO"),
            ("duplicates", "bigint", "NO"), ("instance", "text", "NO"),
            ("recorded_at", "timestamp with time zone", "NO")]
    assert upgraded.totals().series[KEY].requests == 1  # the data of version 1 is kept
    key = BatchKey("after-upgrade", b"body")
    assert upgraded.record([[ev("v1"), ev("v2")]], [key]) == [BatchResult(1, 1)]
    assert upgraded.record([[ev("v1"), ev("v2")]], [key]) == [BatchResult(1, 1, replayed=True)]
