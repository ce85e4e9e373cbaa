"""Queries on a SQLite ledger connection that both of serve's processes run, each on its
own connection: the server reads totals, spend and keys and writes the readiness row; the
writer process (a plain SQLiteLedger) does the same on its writer connection."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from datetime import datetime
from decimal import Decimal

from llm_cost_exporter.ledger.base import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LatencyTotals,
    LedgerUnavailable,
    SeriesKey,
    SeriesTotals,
    Totals,
    stored_key_result,
)

PICO = Decimal("1e12")


def load_totals(conn: sqlite3.Connection) -> Totals:
    """The committed running totals, as start-up reads them (never from the events)."""
    totals = Totals()
    for row in conn.execute(
        "SELECT department, project, provider, model, outcome, requests, input, cache_read,"
        " cache_write, output, reasoning, unpriced, cost_usd, estimated FROM totals"
    ):
        totals.series[SeriesKey(*row[:5])] = SeriesTotals(
            requests=row[5], input=row[6], cache_read=row[7], cache_write=row[8],
            output=row[9], reasoning=row[10], unpriced=row[11], cost=Decimal(row[12]),
            estimated=row[13])
    for provider, model, counts, total, count in conn.execute(
        "SELECT provider, model, counts, total, count FROM latency_totals"
    ):
        totals.latency[(provider, model)] = LatencyTotals(json.loads(counts), total, count)
    return totals


def write_health(conn: sqlite3.Connection) -> None:
    """A real (tiny) committed write: proves the file and the disk take writes now."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)",
                     (time.time(),))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        rollback(conn)
        raise LedgerUnavailable(f"ledger not writable: {exc}") from exc


def read_spend(conn: sqlite3.Connection, department: str, project: str | None,
               start: datetime, end: datetime) -> Decimal:
    """USD spent in [start, end), from the 15-minute spend slots."""
    lo, hi = int(start.timestamp()), int(end.timestamp())
    if project is None:
        query = "SELECT cost_pico FROM spend_slots WHERE department=? AND slot>=? AND slot<?"
        args: tuple[object, ...] = (department, lo, hi)
    else:
        query = ("SELECT cost_pico FROM spend_slots WHERE department=? AND project=?"
                 " AND slot>=? AND slot<?")
        args = (department, project, lo, hi)
    try:
        rows = conn.execute(query, args).fetchall()
    except sqlite3.Error as exc:
        raise LedgerUnavailable(f"ledger not readable: {exc}") from exc
    # Summed in Python: arbitrary precision, no 64-bit overflow. (Had SQLite's own sum in a
    # row overflowed, it stored a float; str() keeps that row usable.)
    return sum((Decimal(r[0]) if isinstance(r[0], int) else Decimal(str(r[0]))
                for r in rows), Decimal(0)) / PICO


def stored_key(conn: sqlite3.Connection, key: BatchKey
                ) -> BatchResult | IdempotencyConflict | None:
    """The first result of a batch sent with this key before, or None if the key is new."""
    row = conn.execute("SELECT digest, accepted, duplicates FROM ingest_keys WHERE key = ?",
                       (key.key,)).fetchone()
    return None if row is None else stored_key_result(key, *row)


def rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
