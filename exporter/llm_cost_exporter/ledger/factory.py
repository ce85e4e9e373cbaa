"""Open the ledger the config names: the one place serve and the CLI choose a backend."""

from __future__ import annotations

from llm_cost_exporter.config_ledger import LedgerConfig
from llm_cost_exporter.ledger.base import Ledger, LedgerUnavailable


def open_ledger(config: LedgerConfig, claim_timeout: float | None = None,
                serving: bool = False) -> Ledger:
    """Open (and migrate) the configured ledger; raises LedgerUnavailable.

    claim_timeout: how long a PostgreSQL ledger waits for another process holding the same
    instance name to go away (serve waits for a killed predecessor; tools do not).
    serving: `serve` opens it; a SQLite ledger then commits in a writer process of its own
    (unless `ledger.writer_process: false`), tools write in their own process.
    """
    if config.backend == "postgres":
        # Imported here: psycopg is only needed by deployments that use PostgreSQL.
        from llm_cost_exporter.ledger.postgres import PostgresLedger

        assert config.dsn is not None  # config validation guarantees it
        return PostgresLedger(config.dsn, config.instance, config.pool_size,
                              claim_timeout=claim_timeout)
    if serving and config.writer_process:
        from llm_cost_exporter.ledger.sqlite_process import SQLiteProcessLedger

        return SQLiteProcessLedger(config.path, config.synchronous)
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger

    return SQLiteLedger(config.path, config.synchronous)


def migrate_ledger(config: LedgerConfig) -> tuple[int, int]:
    """Bring the ledger's schema up to date without serving: (version before, after)."""
    if config.backend == "postgres":
        import psycopg

        from llm_cost_exporter.ledger import pg_migrations
        from llm_cost_exporter.ledger.postgres import connect_kwargs

        assert config.dsn is not None
        try:
            with psycopg.connect(config.dsn,
                                 **connect_kwargs(config.dsn, config.instance)) as conn:
                return pg_migrations.migrate(conn)
        except psycopg.Error as exc:
            raise LedgerUnavailable(f"cannot migrate the ledger database: {exc}") from exc
    import sqlite3

    from llm_cost_exporter.ledger import migrations

    config.path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(config.path, isolation_level=None)
    try:
        before = migrations.current_version(conn)
        return before, migrations.migrate(conn)
    finally:
        conn.close()
