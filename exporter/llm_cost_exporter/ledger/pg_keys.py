"""Idempotency-Keys of the PostgreSQL ledger: one `ingest_keys` table shared by all replicas.

A keyed batch claims its key before it writes its events, in the savepoint that holds
them, and stores its counts in the key row before COMMIT:

- The claim is INSERT ... ON CONFLICT (key) DO NOTHING. If another transaction (another
  replica) inserted the same key and has not finished, the claim waits for it: when that
  one commits, the key is taken and this batch is a replay or a conflict; when it rolls
  back, the claim succeeds. A key is never used by two committed batches.
- A batch that fails rolls its savepoint back, claim included: the client's retry is new.
- A key repeated later in the same commit finds the row, with the counts, of the earlier
  batch (same transaction).
"""

from __future__ import annotations

from typing import Any

import psycopg

from llm_cost_exporter.ledger.base import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    stored_key_result,
)
from llm_cost_exporter.ledger.pg_sql import CLAIM_KEY, READ_KEY, SET_KEY_COUNTS

# copy-ledger: keys of a SQLite ledger, one statement (arrays, as the event insert).
IMPORT_KEYS = (
    "INSERT INTO ingest_keys (instance, key, digest, accepted, duplicates) "
    "SELECT %s, * FROM unnest(%s::text[], %s::bytea[], %s::bigint[], %s::bigint[]) "
    "ON CONFLICT (key) DO NOTHING RETURNING key")


def claim(conn: psycopg.Connection[Any], key: BatchKey,
          instance: str) -> BatchResult | IdempotencyConflict | None:
    """None when this transaction now holds `key` (write the batch, then store_counts);
    otherwise the batch's result: a replay of the key's first batch, or a conflict."""
    while True:
        if conn.execute(CLAIM_KEY, (key.key, key.digest, instance)).fetchone() is not None:
            return None
        # A statement of its own (READ COMMITTED: a new snapshot), so it sees the row the
        # claim waited for; the claim's own snapshot predates that commit.
        row = conn.execute(READ_KEY, (key.key,)).fetchone()
        if row is not None:
            break
        # Gone in between (nothing deletes keys today, a clean-up job might): claim again.
    return stored_key_result(key, *row)


def lookup(conn: psycopg.Connection[Any], key: BatchKey
           ) -> BatchResult | IdempotencyConflict | None:
    row = conn.execute(READ_KEY, (key.key,)).fetchone()
    return None if row is None else stored_key_result(key, *row)


def store_counts(conn: psycopg.Connection[Any], key: BatchKey, accepted: int,
                 duplicates: int) -> None:
    """The claimed key's batch is written: what a replay of it will report."""
    conn.execute(SET_KEY_COUNTS, (accepted, duplicates, key.key))
