"""Versioned PostgreSQL schema, the same idea as the SQLite one (migrations.py): append a
migration, never edit one that has shipped. Several replicas may start at once: each
migration runs in its own transaction under an advisory lock, after re-reading the version.
"""

from __future__ import annotations

from typing import Any

# Any constant works; it only has to be the same in every replica ("llm-cost" in ASCII).
MIGRATION_LOCK = 0x6C6C6D2D636F7374

MIGRATIONS: tuple[str, ...] = (
    # 1: the same tables as the SQLite ledger, plus the replica that recorded each event.
    #    Running totals are per replica (each one exports its own counters, so summing over
    #    replicas counts an event once); spend slots are shared by all replicas (every
    #    replica exports and enforces the same budget spend). Money is exact: NUMERIC for
    #    costs, whole pico-USD for spend slots as in SQLite.
    """
    CREATE TABLE events (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        request_id TEXT UNIQUE,
        ts TIMESTAMPTZ NOT NULL,
        instance TEXT NOT NULL,
        department TEXT NOT NULL, project TEXT NOT NULL,
        provider TEXT NOT NULL, model TEXT NOT NULL,
        raw_department TEXT, raw_project TEXT, raw_model TEXT,
        user_name TEXT,
        outcome TEXT NOT NULL,
        input BIGINT NOT NULL, cache_read BIGINT NOT NULL, cache_write BIGINT NOT NULL,
        cache_write_1h BIGINT NOT NULL, output BIGINT NOT NULL, reasoning BIGINT NOT NULL,
        cost_usd NUMERIC NOT NULL, priced BOOLEAN NOT NULL, price_source TEXT NOT NULL,
        latency_seconds DOUBLE PRECISION, source TEXT NOT NULL,
        estimated BOOLEAN NOT NULL DEFAULT false,
        recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX events_ts ON events (ts);
    CREATE TABLE totals (
        instance TEXT NOT NULL,
        department TEXT NOT NULL, project TEXT NOT NULL, provider TEXT NOT NULL,
        model TEXT NOT NULL, outcome TEXT NOT NULL,
        requests BIGINT NOT NULL, input BIGINT NOT NULL, cache_read BIGINT NOT NULL,
        cache_write BIGINT NOT NULL, output BIGINT NOT NULL, reasoning BIGINT NOT NULL,
        unpriced BIGINT NOT NULL, cost_usd NUMERIC NOT NULL, estimated BIGINT NOT NULL,
        PRIMARY KEY (instance, department, project, provider, model, outcome)
    );
    CREATE TABLE latency_totals (
        instance TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
        counts BIGINT[] NOT NULL, total DOUBLE PRECISION NOT NULL, count BIGINT NOT NULL,
        PRIMARY KEY (instance, provider, model)
    );
    -- Spend per scope per 15-minute slot (every IANA offset is a multiple of 15 minutes,
    -- so any local day or month is a whole number of slots), in whole pico-USD as in
    -- SQLite, but NUMERIC: a BIGINT would overflow above $9.2M in one slot.
    CREATE TABLE spend_slots (
        department TEXT NOT NULL, project TEXT NOT NULL, slot BIGINT NOT NULL,
        cost_pico NUMERIC NOT NULL,
        PRIMARY KEY (department, project, slot)
    );
    -- Readiness checks write here: proves this replica can write now (a read-only standby
    -- after a failover fails it).
    CREATE TABLE health (instance TEXT PRIMARY KEY, checked_at TIMESTAMPTZ NOT NULL)
    """,
    # 2: Idempotency-Keys of ingest batches (pg_keys.py), with the result each batch had the
    #    first time. Shared by all replicas: a retry that reaches another replica is still a
    #    replay. `instance` is the replica that recorded the batch.
    """
    CREATE TABLE ingest_keys (
        key TEXT PRIMARY KEY,
        digest BYTEA NOT NULL,
        accepted BIGINT NOT NULL, duplicates BIGINT NOT NULL,
        instance TEXT NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
)


def _version(conn: Any) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                 "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def current_version(conn: Any) -> int:
    """The schema version of the database (0 when it has none). conn: autocommit."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)


def migrate(conn: Any) -> tuple[int, int]:
    """Apply pending migrations on an autocommit psycopg connection: (before, after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        before = _version(conn)
    _refuse_newer(before)
    version = before
    while version < len(MIGRATIONS):
        with conn.transaction():
            # Serialises replicas that start together; the version is re-read under the lock.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = _version(conn)
            _refuse_newer(version)
            if version >= len(MIGRATIONS):
                break
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            version += 1
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return before, version


def _refuse_newer(version: int) -> None:
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"ledger schema version {version} is newer than this exporter knows "
            f"({len(MIGRATIONS)}): upgrade the exporter")
