"""copy-ledger: move a SQLite ledger's events into the PostgreSQL ledger.

Events go through PostgresLedger.record(), the same path as live traffic, so the totals of
the copying instance and the shared spend slots are recomputed from exactly the events that
were new. A re-run (or a run after more events reached the SQLite file) copies only what is
missing: events are unique on request_id, and an event recorded without one gets an id
derived from its SQLite row, the same on every run. Idempotency-Keys go along (a key
already in PostgreSQL is kept), so a client retrying a batch across the move is answered as
a replay instead of being counted twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from llm_cost_exporter.events import (
    Attribution,
    PricedEvent,
    SeriesLabels,
    TokenCounts,
    UsageEvent,
)
from llm_cost_exporter.ledger.base import Ledger

CHUNK_EVENTS = 5000
_COLUMNS = ("id", "request_id", "ts", "department", "project", "provider", "model",
            "raw_department", "raw_project", "raw_model", "user_name", "outcome", "input",
            "cache_read", "cache_write", "cache_write_1h", "output", "reasoning", "cost_usd",
            "priced", "price_source", "latency_seconds", "source", "recorded_at")


@dataclass
class CopyReport:
    read: int = 0
    copied: int = 0
    already_present: int = 0
    cost_copied: Decimal = Decimal(0)
    keys_copied: int = 0


def derived_request_id(row: tuple[Any, ...]) -> str:
    """Stable id of an event stored without request_id: its SQLite row, hashed.

    The row id and recording time make two identical calls distinct, and the content makes
    rows of two different SQLite files (both starting at row 1) distinct.
    """
    digest = hashlib.sha256(repr(row).encode()).hexdigest()[:32]
    return f"sqlite:{digest}"


def read_sqlite_keys(path: Path) -> list[tuple[str, bytes, int, int]]:
    """(key, digest, accepted, duplicates) of every Idempotency-Key the SQLite file holds."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ingest_keys'").fetchone():
            return []  # a ledger from before keys existed
        return conn.execute("SELECT key, digest, accepted, duplicates FROM ingest_keys"
                            ).fetchall()
    finally:
        conn.close()


def read_sqlite_events(path: Path, chunk: int = CHUNK_EVENTS) -> Iterator[list[PricedEvent]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SQLite ledger")
    # Read-only: the source may belong to a sidecar that is still running.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
        if not names:
            raise ValueError(f"{path}: not an llm-cost-exporter ledger (no events table)")
        estimated = "estimated" if "estimated" in names else "0"
        sql = (f"SELECT {', '.join(_COLUMNS)}, {estimated} FROM events WHERE id > ? "
               "ORDER BY id LIMIT ?")
        last = 0
        while True:
            rows = conn.execute(sql, (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [_priced(row) for row in rows]
    finally:
        conn.close()


def _priced(row: tuple[Any, ...]) -> PricedEvent:
    r: dict[str, Any] = dict(zip((*_COLUMNS, "estimated"), row, strict=True))
    department, project, model = r["department"], r["project"], r["model"]
    tokens = TokenCounts(input=r["input"], cache_read=r["cache_read"],
                         cache_write=r["cache_write"], cache_write_1h=r["cache_write_1h"],
                         output=r["output"], reasoning=r["reasoning"])
    event = UsageEvent(
        # raw_* are stored only where the exported label differs (a capped "other" value).
        attribution=Attribution(r["raw_department"] or department,
                                r["raw_project"] or project, r["user_name"]),
        provider=r["provider"], model=r["raw_model"] or model, tokens=tokens,
        timestamp=datetime.fromtimestamp(r["ts"], UTC), outcome=r["outcome"],
        latency_seconds=r["latency_seconds"],
        request_id=r["request_id"] if r["request_id"] is not None else derived_request_id(row),
        source=r["source"], estimated=bool(r["estimated"]))
    return PricedEvent(event=event, labels=SeriesLabels(department, project, r["provider"], model),
                       cost=Decimal(r["cost_usd"]), priced=bool(r["priced"]),
                       price_source=r["price_source"])


def copy_sqlite_ledger(path: Path, ledger: Ledger,
                       progress: Callable[[CopyReport], None] | None = None) -> CopyReport:
    """Copy every event of the SQLite ledger at `path` that `ledger` does not hold yet.

    Each chunk is one commit (events, totals and spend together), so an interrupted copy
    leaves a consistent ledger and the next run carries on.
    """
    report = CopyReport()
    for events in read_sqlite_events(path):
        [result] = ledger.record([events])
        if isinstance(result, Exception):
            raise result
        report.read += len(events)
        report.copied += result.accepted
        report.already_present += result.duplicates
        report.cost_copied += sum((events[i].cost for i in result.written), Decimal(0))
        if progress is not None:
            progress(report)
    # After the events: a key must never stand in PostgreSQL for a batch that is not there.
    import_keys = getattr(ledger, "import_keys", None)
    if import_keys is not None:
        report.keys_copied = import_keys(read_sqlite_keys(path))
    return report
