"""Versioned SQLite schema. Append a migration; never edit one that has shipped."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

from llm_cost_exporter.ledger.base import LedgerUnavailable

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: events (the source of truth) and running totals kept in the same transaction, so
    # that scrape and start-up cost depend on the number of series, not of events.
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        request_id TEXT UNIQUE,
        ts REAL NOT NULL,
        department TEXT NOT NULL, project TEXT NOT NULL,
        provider TEXT NOT NULL, model TEXT NOT NULL,
        raw_department TEXT, raw_project TEXT, raw_model TEXT,
        user_name TEXT,
        outcome TEXT NOT NULL,
        input INTEGER NOT NULL, cache_read INTEGER NOT NULL, cache_write INTEGER NOT NULL,
        cache_write_1h INTEGER NOT NULL, output INTEGER NOT NULL, reasoning INTEGER NOT NULL,
        cost_usd TEXT NOT NULL, priced INTEGER NOT NULL, price_source TEXT NOT NULL,
        latency_seconds REAL, source TEXT NOT NULL, recorded_at REAL NOT NULL
    );
    CREATE INDEX events_ts ON events(ts);
    CREATE TABLE totals (
        department TEXT NOT NULL, project TEXT NOT NULL, provider TEXT NOT NULL,
        model TEXT NOT NULL, outcome TEXT NOT NULL,
        requests INTEGER NOT NULL, input INTEGER NOT NULL, cache_read INTEGER NOT NULL,
        cache_write INTEGER NOT NULL, output INTEGER NOT NULL, reasoning INTEGER NOT NULL,
        unpriced INTEGER NOT NULL, cost_usd TEXT NOT NULL,
        PRIMARY KEY (department, project, provider, model, outcome)
    ) WITHOUT ROWID;
    CREATE TABLE latency_totals (
        provider TEXT NOT NULL, model TEXT NOT NULL,
        counts TEXT NOT NULL, total REAL NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (provider, model)
    ) WITHOUT ROWID;
    -- Spend per scope per 15-minute slot, in pico-USD: every IANA zone's offset is a
    -- multiple of 15 minutes, so any local day or month is a whole number of slots.
    CREATE TABLE spend_slots (
        department TEXT NOT NULL, project TEXT NOT NULL, slot INTEGER NOT NULL,
        cost_pico INTEGER NOT NULL,
        PRIMARY KEY (department, project, slot)
    ) WITHOUT ROWID;
    """,
    # 2: how many events had their tokens estimated (a stream that ended without usage).
    """
    ALTER TABLE events ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE totals ADD COLUMN estimated INTEGER NOT NULL DEFAULT 0
    """,
    # 3: a one-row table that readiness checks write to, so /readyz sees a full disk or a
    # read-only file before an event is refused.
    """
    CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL)
    """,
    # 4: Idempotency-Keys of ingest batches: one row per keyed batch, written in the batch's
    # own transaction, so a retried batch is recognised without a per-event request_id.
    """
    CREATE TABLE ingest_keys (
        key TEXT PRIMARY KEY, digest BLOB NOT NULL,
        accepted INTEGER NOT NULL, duplicates INTEGER NOT NULL, recorded_at REAL NOT NULL
    ) WITHOUT ROWID
    """,
    # 5: the event rows keep their numbers and times; the strings an event shares with many
    # others (labels, raw values, user, outcome, price source, source, flags) are stored once
    # per distinct set in `label_sets` and referenced by id. An event row is 12 values
    # instead of 24, and insert time per event fell by about 40%. `events` stays readable as
    # before, with the same columns, as a view. In label_sets '' stands for NULL: no label,
    # raw value or user is ever empty, and a UNIQUE index would not match NULLs. The check
    # table makes the whole upgrade fail (and roll back) unless every event was carried over.
    """
    CREATE TABLE label_sets (
        id INTEGER PRIMARY KEY,
        department TEXT NOT NULL, project TEXT NOT NULL,
        provider TEXT NOT NULL, model TEXT NOT NULL,
        raw_department TEXT NOT NULL, raw_project TEXT NOT NULL, raw_model TEXT NOT NULL,
        user_name TEXT NOT NULL, outcome TEXT NOT NULL, priced INTEGER NOT NULL,
        price_source TEXT NOT NULL, source TEXT NOT NULL, estimated INTEGER NOT NULL,
        UNIQUE (department, project, provider, model, raw_department, raw_project, raw_model,
                user_name, outcome, priced, price_source, source, estimated)
    );
    CREATE TABLE event_rows (
        id INTEGER PRIMARY KEY,
        request_id TEXT UNIQUE,
        ts REAL NOT NULL,
        label_set INTEGER NOT NULL REFERENCES label_sets (id),
        input INTEGER NOT NULL, cache_read INTEGER NOT NULL, cache_write INTEGER NOT NULL,
        cache_write_1h INTEGER NOT NULL, output INTEGER NOT NULL, reasoning INTEGER NOT NULL,
        cost_usd TEXT NOT NULL, latency_seconds REAL, recorded_at REAL NOT NULL
    );
    INSERT INTO label_sets (department, project, provider, model, raw_department, raw_project,
        raw_model, user_name, outcome, priced, price_source, source, estimated)
    SELECT DISTINCT department, project, provider, model, IFNULL(raw_department, ''),
        IFNULL(raw_project, ''), IFNULL(raw_model, ''), IFNULL(user_name, ''), outcome, priced,
        price_source, source, estimated
    FROM events;
    INSERT INTO event_rows (id, request_id, ts, label_set, input, cache_read, cache_write,
        cache_write_1h, output, reasoning, cost_usd, latency_seconds, recorded_at)
    SELECT e.id, e.request_id, e.ts, s.id, e.input, e.cache_read, e.cache_write,
        e.cache_write_1h, e.output, e.reasoning, e.cost_usd, e.latency_seconds, e.recorded_at
    FROM events e JOIN label_sets s ON s.department = e.department
        AND s.project = e.project AND s.provider = e.provider AND s.model = e.model
        AND s.raw_department = IFNULL(e.raw_department, '')
        AND s.raw_project = IFNULL(e.raw_project, '') AND s.raw_model = IFNULL(e.raw_model, '')
        AND s.user_name = IFNULL(e.user_name, '') AND s.outcome = e.outcome
        AND s.priced = e.priced AND s.price_source = e.price_source AND s.source = e.source
        AND s.estimated = e.estimated
    ORDER BY e.id;
    CREATE TEMP TABLE migration_5_check (ok INTEGER NOT NULL CHECK (ok = 1));
    INSERT INTO migration_5_check
    SELECT (SELECT COUNT(*) FROM events) = (SELECT COUNT(*) FROM event_rows);
    DROP TABLE migration_5_check;
    DROP TABLE events;
    CREATE INDEX event_rows_ts ON event_rows (ts);
    CREATE VIEW events AS
    SELECT e.id AS id, e.request_id AS request_id, e.ts AS ts, s.department AS department,
        s.project AS project, s.provider AS provider, s.model AS model,
        NULLIF(s.raw_department, '') AS raw_department,
        NULLIF(s.raw_project, '') AS raw_project, NULLIF(s.raw_model, '') AS raw_model,
        NULLIF(s.user_name, '') AS user_name, s.outcome AS outcome, e.input AS input,
        e.cache_read AS cache_read, e.cache_write AS cache_write,
        e.cache_write_1h AS cache_write_1h, e.output AS output, e.reasoning AS reasoning,
        e.cost_usd AS cost_usd, s.priced AS priced, s.price_source AS price_source,
        e.latency_seconds AS latency_seconds, s.source AS source,
        e.recorded_at AS recorded_at, s.estimated AS estimated
    FROM event_rows e JOIN label_sets s ON s.id = e.label_set
    """,
)


def current_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Apply pending migrations (up to `target`, default all), each in its own transaction.
    Returns the new version."""
    version = current_version(conn)
    target = len(MIGRATIONS) if target is None else target
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"ledger schema version {version} is newer than this exporter knows "
            f"({len(MIGRATIONS)}): upgrade the exporter"
        )
    target = min(target, len(MIGRATIONS))
    for number, script in enumerate(MIGRATIONS[version:target], start=version + 1):
        if number in REWRITES_EVENTS:
            _check_room(conn, number)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on a full disk
                conn.execute("ROLLBACK")
            raise
    return max(version, target)


# Migrations that copy every event: while one runs (one transaction), the new rows sit in
# the write-ahead log beside the old ones. bench/startup.py: 4.3 s for 1,000,000 events and
# 67 s for 10,000,000; at their peak the database and its log took 2.85 times the old file.
REWRITES_EVENTS = frozenset({5})
ROOM_FACTOR = 2


def _check_room(conn: sqlite3.Connection, number: int) -> None:
    """Refuse, before it starts, an upgrade the disk has no room for, rather than fail
    with a full disk half-way (it would roll back, but only after minutes)."""
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if not path or conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events' AND "
                                "type = 'table'").fetchone() is None:
        return  # in memory, or no events table
    if conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is None:
        return  # nothing to copy (a new ledger passes through every migration)
    wal = Path(path + "-wal")
    size = (conn.execute("PRAGMA page_count").fetchone()[0]
            * conn.execute("PRAGMA page_size").fetchone()[0]
            + (wal.stat().st_size if wal.exists() else 0))
    free = shutil.disk_usage(Path(path).parent).free
    if free < ROOM_FACTOR * size:
        raise LedgerUnavailable(
            f"upgrading the ledger {path} to schema version {number} copies its events and "
            f"needs about {_size(ROOM_FACTOR * size)} free on its disk; {_size(free)} "
            "are free")
    log.info("upgrading the ledger schema: this copies every event once (4-7 s per "
             "million events) and the exporter is not ready meanwhile",
             extra={"ledger": path, "schema_version": number, "ledger_bytes": size})


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.0f} kB"
