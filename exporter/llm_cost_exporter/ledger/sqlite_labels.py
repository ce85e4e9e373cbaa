"""Ids of the `label_sets` rows that event rows point to (SQLite schema version 5).

An event's strings (labels, raw values, user, outcome, price source, source) and its two
flags repeat across thousands of events: they are stored once per distinct set, and the
event row holds the set's id. The writer keeps the ids it knows in memory.

An id created inside a transaction is only cached once that transaction commits. A batch
that fails is rolled back (to its savepoint, or with the whole transaction), and with it the
label sets it created: a cached id of a rolled-back row would make later events point at
nothing, and the `events` view, a join, would silently lose them.
"""

from __future__ import annotations

import sqlite3

from llm_cost_exporter.events import SeriesLabels

# (labels, raw_department, raw_project, raw_model, user_name, outcome, priced, price_source,
# source, estimated); '' stands for NULL, as in the table.
SetKey = tuple[SeriesLabels, str, str, str, str, str, bool, str, str, bool]

_COLUMNS = ("department, project, provider, model, raw_department, raw_project, raw_model, "
            "user_name, outcome, priced, price_source, source, estimated")
_FIND = ("SELECT id FROM label_sets WHERE department = ? AND project = ? AND provider = ? "
         "AND model = ? AND raw_department = ? AND raw_project = ? AND raw_model = ? "
         "AND user_name = ? AND outcome = ? AND priced = ? AND price_source = ? "
         "AND source = ? AND estimated = ?")
_INSERT = f"INSERT INTO label_sets ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
# Bounded: users and raw values (an attacker's project names) have no cap. Only keys whose
# client-sent strings are all short are cached (as ingest's label cache does), so a key is
# at most about 1 KB and 8,192 keys a few MB; past that the cache starts again. A key not
# cached costs one lookup in the table's UNIQUE index per event.
MAX_CACHED = 8_192
MAX_CACHED_CHARS = 64


class LabelSets:
    def __init__(self, max_cached: int | None = None) -> None:
        # Committed sets: the writer's hot path reads this dict directly.
        self.known: dict[SetKey, int] = {}
        self._max = MAX_CACHED if max_cached is None else max_cached
        self._transaction: dict[SetKey, int] = {}  # created by kept batches, not committed
        self._batch: dict[SetKey, int] = {}  # created by the batch being written

    def resolve(self, conn: sqlite3.Connection, key: SetKey) -> int:
        """The id of a set not in `known`: created earlier in this transaction, found in the
        table, or inserted now (inside the caller's transaction)."""
        found = self._transaction.get(key) or self._batch.get(key)
        if found is not None:
            return found
        labels, *rest = key
        values = (labels.department, labels.project, labels.provider, labels.model, *rest)
        row = conn.execute(_FIND, values).fetchone()
        found = int(row[0] if row is not None else conn.execute(_INSERT, values).lastrowid)
        # Not cached, a set is still found: this connection sees its own uncommitted rows.
        if max(len(v) for v in values if type(v) is str) <= MAX_CACHED_CHARS:
            self._batch[key] = found
        return found

    def batch_kept(self) -> None:
        self._transaction.update(self._batch)
        self._batch.clear()

    def batch_dropped(self) -> None:
        """The batch was rolled back to its savepoint: the sets it created are gone."""
        self._batch.clear()

    def committed(self) -> None:
        if len(self.known) + len(self._transaction) > self._max:
            self.known.clear()
        self.known.update(self._transaction)
        self._transaction.clear()
        self._batch.clear()

    def rolled_back(self) -> None:
        self._transaction.clear()
        self._batch.clear()
