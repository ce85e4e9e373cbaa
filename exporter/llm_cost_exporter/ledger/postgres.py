"""PostgreSQL ledger: several exporter replicas share one database.

- `events` is unique on request_id across all replicas and written with INSERT ... ON
  CONFLICT DO NOTHING, so an event sent to two replicas is stored once. Only rows that were
  actually inserted (RETURNING) move totals and spend. When two transactions insert the same
  request_id at once, the second waits for the first: it skips the row if the first
  committed and inserts it if the first rolled back, so nothing is lost or counted twice.
- `totals`/`latency_totals` are per replica (`instance`): /metrics shows this replica's own
  rows, kept in memory and loaded at start, so `sum()` over replicas counts an event once.
- `spend_slots` is shared: every replica reads the same budget spend.
- `ingest_keys` is shared: a retry with the same Idempotency-Key is a replay whichever
  replica it reaches (pg_keys.py).

The pool hands out only connections that answer (`check`), gives up quickly while the
database is away (ingest gets 503 within POOL_TIMEOUT) and reconnects on the next request
once it is back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger import pg_keys
from llm_cost_exporter.ledger.base import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LatencyTotals,
    LedgerUnavailable,
    SeriesKey,
    SeriesTotals,
    Totals,
)
from llm_cost_exporter.ledger.pg_instance import InstanceClaim
from llm_cost_exporter.ledger.pg_migrations import migrate
from llm_cost_exporter.ledger.pg_sql import (
    ADD_SPEND,
    INSERT_EVENTS,
    LOAD_LATENCY,
    LOAD_TOTALS,
    PICO,
    SESSION_SETTINGS,
    UPSERT_LATENCY,
    UPSERT_TOTALS,
    WRITE_HEALTH,
    columns,
    event_row,
    pg_text,
)
from llm_cost_exporter.ledger.pg_tally import Delta, merge, new_positions, pick, tally

log = logging.getLogger(__name__)
# How long a request waits for a connection before the ledger counts as unavailable (503).
POOL_TIMEOUT = 3.0
# How long the pool keeps retrying one connection attempt in the background; the next
# request starts a new attempt, so recovery never waits on a long exponential backoff.
RECONNECT_TIMEOUT = 5.0
# A batch that fails on its data (not on the connection) fails alone, as in SQLite; a
# string that cannot be encoded (a lone surrogate) fails in the client, before sending.
_BATCH_ERRORS = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
                 UnicodeError)
# Lost a lock-ordering race with another replica: nothing was committed, try again.
_RETRY_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def connect_kwargs(dsn: str, instance: str) -> dict[str, Any]:
    """libpq settings the DSN does not set itself: bounded connects and dead-peer detection,
    so a vanished server turns into an error within seconds instead of a hung writer."""
    given = conninfo_to_dict(dsn)
    defaults: dict[str, Any] = {
        "connect_timeout": 5, "application_name": f"llm-cost-exporter {instance}"[:63],
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
        "keepalives_count": 3, "tcp_user_timeout": 15_000,
    }
    return {"autocommit": True, **{k: v for k, v in defaults.items() if k not in given}}


def _configure(conn: psycopg.Connection[Any]) -> None:
    for statement in SESSION_SETTINGS:
        conn.execute(statement)


class PostgresLedger:
    # Commits wait on the network: CommitQueue keeps its writer thread for them.
    cheap_commits = False
    cheap_reads = False
    # Other processes write it too: budget enforcement re-reads spend in the background.
    shared = True

    def __init__(self, dsn: str, instance: str, pool_size: int = 4,
                 start_timeout: float = 30.0, claim_timeout: float | None = None) -> None:
        """Migrate, claim `instance`, load its totals. Waits up to `start_timeout` for the
        database, and up to `claim_timeout` (default: the rest of it) for a previous
        process of the same name to let go."""
        self.instance = instance
        self._write_lock = threading.Lock()
        self._totals_lock = threading.Lock()
        # Set when a commit may or may not have happened (connection lost around COMMIT):
        # totals are re-read from the database before the next write.
        self._resync = False
        # The pool's own retry warnings would repeat on every attempt while the database is
        # down; the exporter logs each refused write itself.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        kwargs = connect_kwargs(dsn, instance)
        deadline = time.monotonic() + start_timeout
        self.schema_version = self._migrate_at_start(dsn, kwargs, deadline)
        self._claim = InstanceClaim(dsn, kwargs, instance)
        self._claim.acquire(max(1.0, deadline - time.monotonic()) if claim_timeout is None
                            else claim_timeout)
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, kwargs=kwargs, configure=_configure,
            check=ConnectionPool.check_connection, timeout=POOL_TIMEOUT,
            reconnect_timeout=RECONNECT_TIMEOUT, name=f"ledger-{instance}", open=False)
        try:
            self._pool.open(wait=True, timeout=max(1.0, deadline - time.monotonic()))
            self._totals = self._load_totals()
        except (PoolTimeout, psycopg.Error) as exc:
            self.close()
            raise LedgerUnavailable(f"cannot open ledger database: {exc}") from exc

    @staticmethod
    def _migrate_at_start(dsn: str, kwargs: dict[str, Any], deadline: float) -> int:
        # A replica may start before its database (compose, a rolling restart): wait a bit.
        while True:
            try:
                with psycopg.connect(dsn, **kwargs) as conn:
                    return migrate(conn)[1]
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise LedgerUnavailable(f"cannot reach ledger database: {exc}") from exc
                log.warning("waiting for the ledger database", extra={"error": str(exc)})
                time.sleep(1.0)
            except psycopg.Error as exc:  # e.g. no privilege to create the tables
                raise LedgerUnavailable(f"cannot migrate ledger database: {exc}") from exc

    # -- start-up and recovery ------------------------------------------------------------
    def _load_totals(self) -> Totals:
        totals = Totals()
        with self._pool.connection() as conn:
            for row in conn.execute(LOAD_TOTALS, (self.instance,)):
                totals.series[SeriesKey(*row[:5])] = SeriesTotals(
                    requests=row[5], input=row[6], cache_read=row[7], cache_write=row[8],
                    output=row[9], reasoning=row[10], unpriced=row[11], cost=row[12],
                    estimated=row[13])
            for provider, model, counts, total, count in conn.execute(
                    LOAD_LATENCY, (self.instance,)):
                totals.latency[(provider, model)] = LatencyTotals(list(counts), total, count)
        return totals

    def _recover(self) -> None:
        """Still hold the instance name; after a lost commit, re-read our own totals."""
        self._claim.ensure(max_age=1.0)
        if self._resync:
            try:
                fresh = self._load_totals()
            except (PoolTimeout, psycopg.Error) as exc:
                raise LedgerUnavailable(f"ledger database unreachable: {exc}") from exc
            with self._totals_lock:
                self._totals = fresh
            self._resync = False
            log.warning("running totals re-read from the ledger after a lost connection")

    # -- writes ---------------------------------------------------------------------------
    def record(self, batches: Sequence[Sequence[PricedEvent]],
               keys: Sequence[BatchKey | None] | None = None) -> list[BatchResult | Exception]:
        """See Ledger.record; each attempt is one whole transaction, keys included."""
        if keys is not None and len(keys) != len(batches):
            raise ValueError("keys must have one entry per batch")
        with self._write_lock:
            self._recover()
            for attempt in range(3):
                try:
                    return self._record(batches, keys or [None] * len(batches))
                except _RETRY_ERRORS as exc:
                    log.warning("ledger commit retried", extra={"error": str(exc),
                                                                "attempt": attempt + 1})
                    last: Exception = exc
                except PoolTimeout as exc:
                    self._claim.suspect()
                    raise LedgerUnavailable(f"ledger database unreachable: {exc}") from exc
                except psycopg.Error as exc:
                    # Perhaps lost during COMMIT: whether it happened is unknown here.
                    self._resync = True
                    self._claim.suspect()
                    raise LedgerUnavailable(f"ledger commit failed: {exc}") from exc
            raise LedgerUnavailable(f"ledger commit failed: {last}")

    def _record(self, batches: Sequence[Sequence[PricedEvent]],
                keys: Sequence[BatchKey | None]) -> list[BatchResult | Exception]:
        # A keyed batch must know whether it holds its key before it writes anything, and
        # must not keep the key if it fails: one savepoint per batch, not pipelined.
        fast = all(key is None for key in keys)
        with self._pool.connection() as conn:
            if fast:
                try:
                    # Fast path: every batch of this commit in one INSERT, pipelined: BEGIN
                    # and the INSERT in one round trip, the totals, spend and COMMIT in another.
                    with conn.pipeline(), conn.transaction():
                        results, delta = self._insert(conn, batches, keys, savepoints=False)
                        self._apply(conn, delta)
                except _BATCH_ERRORS:
                    if conn.broken:
                        raise
                    fast = False  # some batch is bad: again, batch by batch, so only it fails
            if not fast:
                with conn.transaction():
                    results, delta = self._insert(conn, batches, keys, savepoints=True)
                    self._apply(conn, delta)
        # Only now, after COMMIT, do the new totals become visible to scrapes.
        with self._totals_lock:
            merge(self._totals, delta)
        return results

    def _insert(self, conn: psycopg.Connection[Any], batches: Sequence[Sequence[PricedEvent]],
                keys: Sequence[BatchKey | None], savepoints: bool
                ) -> tuple[list[BatchResult | Exception], Delta]:
        # A request_id repeated inside this commit is a duplicate of its first occurrence;
        # `plans` marks, per position, the events that may be new.
        claimed: set[str] = set()
        plans: list[list[bool]] = []
        # Per batch: the request ids it inserted, or its final result (a replay, a failure).
        outcomes: list[set[str] | BatchResult | Exception] = []
        for batch, key in zip(batches, keys, strict=True):
            plan, local = [], set()
            for priced in batch:
                rid = pg_text(priced.event.request_id)
                plan.append(rid is None or (rid not in claimed and rid not in local))
                if rid is not None:
                    local.add(rid)
            plans.append(plan)
            if not savepoints:
                claimed |= local
                continue
            try:
                outcome = self._insert_batch(conn, batch, plan, key)
            except _BATCH_ERRORS as exc:
                if conn.broken:
                    raise
                outcomes.append(LedgerUnavailable(f"batch not written: {exc}"))
                continue
            if isinstance(outcome, set):
                # Only a written batch claims its request ids: after a failure, a replay or
                # a conflict, a later copy of them in this commit may be new.
                claimed |= local
            outcomes.append(outcome)
        if not savepoints:
            inserted = self._insert_rows(conn, [p for batch, plan in zip(batches, plans,
                                                                          strict=True)
                                                for p in pick(batch, plan)])
            outcomes = [inserted] * len(batches)
        return tally(batches, plans, outcomes)

    def _insert_batch(self, conn: psycopg.Connection[Any], batch: Sequence[PricedEvent],
                      plan: list[bool], key: BatchKey | None
                      ) -> set[str] | BatchResult | Exception:
        with conn.transaction():  # SAVEPOINT: all or nothing for this batch, its key too
            if key is not None:
                earlier = pg_keys.claim(conn, key, self.instance)
                if earlier is not None:
                    return earlier  # nothing of this batch is written
            inserted = self._insert_rows(conn, pick(batch, plan))
            if key is not None:
                accepted = len(new_positions(batch, plan, inserted))
                pg_keys.store_counts(conn, key, accepted, len(batch) - accepted)
            return inserted

    def _insert_rows(self, conn: psycopg.Connection[Any],
                     events: Sequence[PricedEvent]) -> set[str]:
        if not events:
            return set()
        # Same order in every replica (by request_id): two commits that share request ids
        # take their row locks in the same order and cannot deadlock.
        rows = sorted((event_row(p) for p in events), key=lambda r: (r[0] is None, r[0] or ""))
        cur = conn.execute(INSERT_EVENTS, [self.instance, *columns(rows)])
        return {rid for (rid,) in cur.fetchall() if rid is not None}

    def _apply(self, conn: psycopg.Connection[Any], delta: Delta) -> None:
        series, latency, spend = delta
        if series:
            rows = [(*key, t.requests, t.input, t.cache_read, t.cache_write, t.output,
                     t.reasoning, t.unpriced, t.cost, t.estimated)
                    for key, t in sorted(series.items())]
            conn.execute(UPSERT_TOTALS, [self.instance, *columns(rows)])
        if latency:
            lat_rows = [(provider, model, "{" + ",".join(map(str, lat.counts)) + "}",
                         lat.total, lat.count)
                        for (provider, model), lat in sorted(latency.items())]
            conn.execute(UPSERT_LATENCY, [self.instance, *columns(lat_rows)])
        if spend:
            # Shared rows: sorted, so concurrent replicas lock them in the same order.
            conn.execute(ADD_SPEND, columns([(*key, pico)
                                              for key, pico in sorted(spend.items())]))

    # -- reads ----------------------------------------------------------------------------
    def totals(self) -> Totals:
        """A consistent snapshot: the dicts are copied, their values shared (a commit
        replaces values, never changes them; see merge)."""
        with self._totals_lock:
            return Totals(series=dict(self._totals.series), latency=dict(self._totals.latency))

    def import_keys(self, rows: Sequence[tuple[str, bytes, int, int]]) -> int:
        """copy-ledger: keys of another ledger, under this instance; existing keys kept."""
        if not rows:
            return 0
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.execute(pg_keys.IMPORT_KEYS, [self.instance, *columns(rows)])
            return len(cur.fetchall())

    def lookup_key(self, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
        try:
            with self._pool.connection() as conn:
                return pg_keys.lookup(conn, key)
        except (PoolTimeout, psycopg.Error) as exc:
            raise LedgerUnavailable(f"ledger not readable: {exc}") from exc

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal:
        lo, hi = int(start.timestamp()), int(end.timestamp())
        sql = ("SELECT SUM(cost_pico) FROM spend_slots WHERE department = %s"
               " AND slot >= %s AND slot < %s")
        args: tuple[object, ...] = (department, lo, hi)
        if project is not None:
            sql += " AND project = %s"
            args = (*args, project)
        try:
            with self._pool.connection() as conn:
                row = conn.execute(sql, args).fetchone()
        except (PoolTimeout, psycopg.Error) as exc:
            raise LedgerUnavailable(f"ledger not readable: {exc}") from exc
        # NUMERIC all the way: exact, no 64-bit overflow.
        return Decimal(row[0] or 0) / PICO if row else Decimal(0)

    def check(self) -> None:
        """A real committed write, from this replica, to a database that answers now."""
        if self._resync:
            with self._write_lock:
                self._recover()
        else:
            self._claim.ensure(max_age=1.0)
        try:
            with self._pool.connection() as conn:
                conn.execute(WRITE_HEALTH, (self.instance,))
        except (PoolTimeout, psycopg.Error) as exc:
            raise LedgerUnavailable(f"ledger not writable: {exc}") from exc

    def label_values(self) -> dict[str, set[str]]:
        """Label values of every replica, so all replicas admit the same values first."""
        out: dict[str, set[str]] = {k: set() for k in ("department", "project", "provider",
                                                       "model")}
        with contextlib.suppress(PoolTimeout, psycopg.Error), self._pool.connection() as conn:
            for row in conn.execute("SELECT DISTINCT department, project, provider, model "
                                    "FROM totals"):
                for name, value in zip(out, row, strict=True):
                    out[name].add(value)
        with self._totals_lock:
            for key in self._totals.series:
                out["department"].add(key.department)
                out["project"].add(key.project)
                out["provider"].add(key.provider)
                out["model"].add(key.model)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.close()
        with contextlib.suppress(Exception):
            self._claim.close()
