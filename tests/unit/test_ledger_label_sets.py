"""Schema version 5: event strings in label_sets, the events view, and the upgrade to it."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest

from llm_cost_exporter.events import (
    Attribution,
    PricedEvent,
    SeriesLabels,
    TokenCounts,
    UsageEvent,
)
from llm_cost_exporter.ledger import (
    BatchResult,
    LedgerRejected,
    LedgerUnavailable,
    migrations,
    sqlite_labels,
)
from llm_cost_exporter.ledger.migrations import MIGRATIONS, migrate
from llm_cost_exporter.ledger.sqlite import SQLiteLedger

TS = datetime(2026, 3, 14, 12, tzinfo=UTC)

# The columns of the version-4 `events` table, in its order: the view must keep them.
V4_COLUMNS = ["id", "request_id", "ts", "department", "project", "provider", "model",
              "raw_department", "raw_project", "raw_model", "user_name", "outcome", "input",
              "cache_read", "cache_write", "cache_write_1h", "output", "reasoning", "cost_usd",
              "priced", "price_source", "latency_seconds", "source", "recorded_at",
              "estimated"]


def priced(rid: str | None, *, user: str | None = "alice", project: str = "app",
           label_project: str = "app", cost: str = "0.5", outcome: str = "success",
           source: str = "ingest", estimated: bool = False) -> PricedEvent:
    event = UsageEvent(Attribution("eng", project, user=user), "openai", "gpt-4o",
                       TokenCounts(input=100, output=50, reasoning=25), TS, outcome=outcome,
                       latency_seconds=1.0, request_id=rid, source=source, estimated=estimated)
    return PricedEvent(event=event,
                       labels=SeriesLabels("eng", label_project, "openai", "gpt-4o"),
                       cost=D(cost), price_source="test")


def rows(path: Path, sql: str = "SELECT * FROM events ORDER BY id") -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_the_upgrade_keeps_every_event_row_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=4) == 4
    v4 = [
        # NULLs where version 4 had them: no request id, raw values, user or latency.
        (1, "r-1", 1.5, "eng", "app", "openai", "gpt-4o", None, None, None, "alice", "success",
         100, 10, 5, 2, 50, 25, "0.000375", 1, "pricing.yaml: gpt-4o", 0.25, "ingest", 2.5, 0),
        (2, None, 3.0, "eng", "other", "openai", "other", "eng2", "typo-app", "gpt-5x", None,
         "error", 0, 0, 0, 0, 0, 0, "0", 0, "", None, "proxy", 3.5, 1),
        (3, "r-3", 4.0, "eng", "app", "openai", "gpt-4o", None, None, None, "alice", "success",
         7, 0, 0, 0, 1, 0, "0.0000275", 1, "pricing.yaml: gpt-4o", 0.5, "ingest", 4.5, 0),
        (7, "r-7", 5.0, "ops", "app", "anthropic", "claude", None, None, None, "bob",
         "client_closed", 1, 2, 3, 1, 4, 0, "1.25", 1, "genai-prices: claude", 9.0, "proxy",
         5.5, 0),
    ]
    conn.executemany(f"INSERT INTO events ({', '.join(V4_COLUMNS)}) VALUES "
                     f"({', '.join('?' * len(V4_COLUMNS))})", v4)
    conn.close()
    ledger = SQLiteLedger(path)  # upgrades
    assert ledger.schema_version == len(MIGRATIONS) == 5
    ledger.close()
    assert rows(path) == v4
    with sqlite3.connect(path) as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(events)")] == V4_COLUMNS
        # Rows 1 and 3 share every string: 3 sets for 4 events.
        assert conn.execute("SELECT COUNT(*) FROM label_sets").fetchone() == (3,)
        assert conn.execute("SELECT COUNT(*) FROM event_rows").fetchone() == (4,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # The request ids stay unique after the upgrade: a retried event is still a duplicate.
    ledger = SQLiteLedger(path)
    assert ledger.record([[priced("r-7"), priced("r-8")]]) == [BatchResult(1, 1)]
    ledger.close()
    assert rows(path, "SELECT id, request_id FROM events WHERE id > 7") == [(8, "r-8")]


def test_events_read_back_through_the_view_with_their_strings(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    batch = [priced("a"), priced("b", user=None),
             priced("c", project="typo", label_project="other"),
             priced("d", outcome="error", source="proxy", estimated=True), priced(None)]
    assert ledger.record([batch]) == [BatchResult(5, 0)]
    ledger.close()
    got = rows(tmp_path / "l.db", "SELECT request_id, project, raw_project, user_name, "
                                  "outcome, source, estimated, priced, price_source FROM events "
                                  "ORDER BY id")
    assert got == [
        ("a", "app", None, "alice", "success", "ingest", 0, 1, "test"),
        ("b", "app", None, None, "success", "ingest", 0, 1, "test"),
        ("c", "other", "typo", "alice", "success", "ingest", 0, 1, "test"),
        ("d", "app", None, "alice", "error", "proxy", 1, 1, "test"),
        (None, "app", None, "alice", "success", "ingest", 0, 1, "test"),
    ]
    # a and the id-less event share one set; b, c and d each have their own.
    assert rows(tmp_path / "l.db", "SELECT COUNT(*) FROM label_sets") == [(4,)]


def test_a_set_created_by_a_rolled_back_batch_is_not_reused(tmp_path: Path) -> None:
    # The first batch creates the set for user "carol", then fails (a cost out of range):
    # its savepoint takes the new row away. Had the writer cached the row's id, the next
    # batch's event would point at nothing, and the view (a join) would drop it silently.
    ledger = SQLiteLedger(tmp_path / "l.db")
    bad = [priced("x1", user="carol"), priced("x2", cost="9" * 10)]
    good = [priced("y1", user="carol")]
    results = ledger.record([bad, good])
    assert isinstance(results[0], LedgerRejected) and results[1] == BatchResult(1, 0)
    # Alone in its commit, the failing batch rolls the whole transaction back instead.
    results = ledger.record([[priced("z1", user="dave"), priced("z2", cost="9" * 10)]])
    assert isinstance(results[0], LedgerRejected)
    assert ledger.record([[priced("z3", user="dave")]]) == [BatchResult(1, 0)]
    ledger.close()
    assert rows(tmp_path / "l.db", "SELECT request_id, user_name FROM events ORDER BY id") == [
        ("y1", "carol"), ("z3", "dave")]
    assert rows(tmp_path / "l.db", "SELECT COUNT(*) FROM event_rows") == [(2,)]


def test_past_its_bound_the_cache_starts_again_and_rows_stay_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_labels, "MAX_CACHED", 10)
    ledger = SQLiteLedger(tmp_path / "l.db")
    users = [f"user-{i % 35}" for i in range(140)]  # 35 sets, each seen 4 times
    for start in range(0, 140, 20):
        batch = [priced(f"e{i}", user=users[i]) for i in range(start, start + 20)]
        assert ledger.record([batch]) == [BatchResult(20, 0)]
    assert len(ledger._label_sets.known) <= 10 + 20  # cleared once over 10 (plus one commit)
    ledger.close()
    assert rows(tmp_path / "l.db", "SELECT user_name FROM events ORDER BY id") == [
        (u,) for u in users]
    assert rows(tmp_path / "l.db", "SELECT COUNT(*) FROM label_sets") == [(35,)]


def test_a_changed_field_is_a_new_set() -> None:
    # Every field of the key is in the table's UNIQUE constraint, in the order the writer
    # looks sets up and inserts them.
    with sqlite3.connect(":memory:") as conn:
        migrate(conn)
        unique = [r for r in conn.execute("PRAGMA index_list(label_sets)") if r[2]]
        assert len(unique) == 1
        columns = [r[2] for r in conn.execute(f"PRAGMA index_info({unique[0][1]})")]
    assert columns == ["department", "project", "provider", "model", "raw_department",
                       "raw_project", "raw_model", "user_name", "outcome", "priced",
                       "price_source", "source", "estimated"]
    assert columns == [c.strip() for c in sqlite_labels._COLUMNS.split(",")]


def v4_ledger(path: Path, events: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=4)
    conn.executemany(
        "INSERT INTO events (request_id, ts, department, project, provider, model, outcome,"
        " input, cache_read, cache_write, cache_write_1h, output, reasoning, cost_usd, priced,"
        " price_source, source, recorded_at) VALUES (?, 1.0, 'eng', 'app', 'openai', 'gpt-4o',"
        " 'success', 1, 0, 0, 0, 1, 0, '0.1', 1, 'test', 'ingest', 1.0)",
        [(f"r{i}",) for i in range(events)])
    conn.close()


def test_an_upgrade_that_would_lose_an_event_fails_and_leaves_the_ledger_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.db"
    v4_ledger(path, 3)
    # A broken conversion that drops the first event: the check must refuse to commit it.
    broken = MIGRATIONS[4].replace("ORDER BY e.id;", "WHERE e.id > 1 ORDER BY e.id;")
    assert broken != MIGRATIONS[4]
    monkeypatch.setattr(migrations, "MIGRATIONS", (*MIGRATIONS[:4], broken))
    with pytest.raises(LedgerUnavailable, match="CHECK constraint failed"):
        SQLiteLedger(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (4,)
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (3,)
        assert conn.execute("SELECT type FROM sqlite_master WHERE name = 'events'"
                            ).fetchone() == ("table",)


def test_an_upgrade_without_room_on_the_disk_is_refused_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.db"
    v4_ledger(path, 100)
    size = path.stat().st_size  # no -wal file: the connection that wrote it has closed
    assert not Path(f"{path}-wal").exists()
    # Room for one more copy of the file, not for two: refused, with the figures.
    monkeypatch.setattr(migrations.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(
        10**12, 10**12 - size, size))
    need, free = round(2 * size / 1000), round(size / 1000)  # a small file: kB, not "0 MB"
    with pytest.raises(LedgerUnavailable, match=rf"schema version 5 copies its events and needs"
                                                rf" about {need} kB free on its disk; {free} kB"
                                                r" are free"):
        SQLiteLedger(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (4,)
    monkeypatch.setattr(migrations.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(
        10**12, 10**12 - 2 * size, 2 * size))
    SQLiteLedger(path).close()  # room for two copies: upgraded
    assert rows(path, "SELECT COUNT(*) FROM events") == [(100,)]


def test_sets_with_long_strings_are_not_cached_and_still_found(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    long_user = "u" * 65  # past MAX_CACHED_CHARS: one indexed lookup per event instead
    assert ledger.record([[priced("a", user=long_user), priced("b", user="short")]]) == [
        BatchResult(2, 0)]
    assert ledger.record([[priced("c", user=long_user)]]) == [BatchResult(1, 0)]
    assert sorted(key[4] for key in ledger._label_sets.known) == ["short"]
    ledger.close()
    assert rows(tmp_path / "l.db", "SELECT request_id, user_name FROM events ORDER BY id") == [
        ("a", long_user), ("b", "short"), ("c", long_user)]
    assert rows(tmp_path / "l.db", "SELECT COUNT(*) FROM label_sets") == [(2,)]


def test_only_an_upgrade_that_copies_events_says_so_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger=migrations.__name__)
    SQLiteLedger(tmp_path / "new.db").close()  # a new ledger: every migration, no events
    v4_ledger(tmp_path / "old.db", 3)
    SQLiteLedger(tmp_path / "old.db").close()
    upgrades = [r for r in caplog.records if r.msg.startswith("upgrading the ledger schema")]
    assert [getattr(r, "ledger", None) for r in upgrades] == [str(tmp_path / "old.db")]
