"""Versioned SQLite schema. Append a migration; never edit one that has shipped."""

from __future__ import annotations

import sqlite3

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
)


def current_version(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations, each in its own transaction. Returns the new version."""
    version = current_version(conn)
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"ledger schema version {version} is newer than this exporter knows "
            f"({len(MIGRATIONS)}): upgrade the exporter"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (number,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
