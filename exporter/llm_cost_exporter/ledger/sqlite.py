"""SQLite ledger (WAL). One writer connection; readers use their own connection."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from llm_cost_exporter.events import PricedEvent, SeriesLabels
from llm_cost_exporter.ledger import sqlite_sql as sql
from llm_cost_exporter.ledger.base import (
    LATENCY_BUCKETS,
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LatencyTotals,
    LedgerRejected,
    LedgerUnavailable,
    SeriesKey,
    SeriesTotals,
    Totals,
    ValueOutOfRange,
    label_values,
)
from llm_cost_exporter.ledger.migrations import migrate
from llm_cost_exporter.ledger.sqlite_labels import LabelSets
from llm_cost_exporter.ledger.sqlite_queries import (
    PICO,
    load_totals,
    read_spend,
    rollback,
    stored_key,
    write_health,
)
from llm_cost_exporter.ledger.sqlite_wal import Checkpointer, bound_wal, connect

SLOT_SECONDS = 900
ZERO = Decimal(0)
# Largest pico-USD value bound in one statement: half of 2^63, so the sum SQLite computes
# with the value already stored stays an integer far longer.
_SLOT_ROW_MAX = 2**62
_NO_TOTALS = SeriesTotals()  # what a series not committed yet adds to (never changed)


class SQLiteLedger:
    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._wal = path.with_name(path.name + "-wal")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        # WAL + synchronous=NORMAL commits without fsync: cheap enough to run on the event
        # loop (see CommitQueue). FULL waits for the disk, so it keeps the writer thread.
        self.cheap_commits = synchronous.upper() == "NORMAL"
        self.cheap_reads = True  # a local file: lookups run on the event loop
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._totals_lock = threading.Lock()
        try:
            self._writer = connect(path, synchronous)
            self.schema_version = migrate(self._writer)
            # A commit of several batches gives each a savepoint, and SQLite keeps the
            # pages a savepoint changes in a sub-journal: a temp file by default, written
            # with three syscalls per page (147 per commit in a batch run, strace; more than
            # the WAL's own writes). In memory it holds at most what one commit touches.
            # Set after the migrations, whose sorts may be large.
            self._writer.execute("PRAGMA temp_store=MEMORY")
            self._reader = connect(path, synchronous)
            self._checkpointer = Checkpointer(path, synchronous)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"cannot open ledger {path}: {exc}") from exc
        self._totals = load_totals(self._writer)
        # The running totals the last commit published (what changed): a writer process
        # sends them to the process that serves /metrics (see sqlite_process.py).
        self.published: tuple[dict[SeriesKey, SeriesTotals],
                              dict[tuple[str, str], LatencyTotals]] = ({}, {})
        self._label_sets = LabelSets()

    # -- writes ---------------------------------------------------------------------------
    def record(self, batches: Sequence[Sequence[PricedEvent]],
               keys: Sequence[BatchKey | None] | None = None) -> list[BatchResult | Exception]:
        with self._write_lock:
            self.published = ({}, {})
            return self._record(batches, keys or [None] * len(batches))

    def _record(self, batches: Sequence[Sequence[PricedEvent]],
                keys: Sequence[BatchKey | None]) -> list[BatchResult | Exception]:
        conn = self._writer
        now = time.time()
        results: list[BatchResult | Exception] = []
        sums: dict[tuple[SeriesLabels, str], list[Any]] = {}
        latency: dict[tuple[str, str], LatencyTotals] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"ledger not writable: {exc}") from exc
        try:
            # One batch: the transaction itself is its all-or-nothing boundary. Several: a
            # savepoint each, so a failing batch does not take its neighbours down.
            savepoints = len(batches) > 1
            for batch, key in zip(batches, keys, strict=True):
                if key is not None:
                    # Inside this transaction: also sees a key an earlier batch of this
                    # same commit stored (a failed batch's savepoint took its key away).
                    earlier = stored_key(conn, key)
                    if earlier is not None:  # a retry (or a reused key): nothing is written
                        results.append(earlier)
                        continue
                if savepoints:
                    conn.execute("SAVEPOINT batch")
                try:
                    result, b_sums, b_latency = self._write_batch(conn, batch, now)
                    if key is not None:
                        conn.execute(sql.INSERT_KEY, (key.key, key.digest, result.accepted,
                                                   result.duplicates, now))
                except (sqlite3.Error, ValueError, OverflowError) as exc:
                    # A database error makes the ledger unavailable; a value it cannot store
                    # (out of range) rejects this batch only. Either way, nothing of it stays.
                    failure: Exception = (
                        LedgerUnavailable(f"batch not written: {exc}")
                        if isinstance(exc, sqlite3.Error) and not isinstance(
                            exc, sqlite3.InterfaceError | sqlite3.DataError)
                        else LedgerRejected(str(exc) if isinstance(exc, ValueOutOfRange)
                                            else f"a value is out of range ({type(exc).__name__})",
                                            getattr(exc, "position", None)))
                    if not savepoints:
                        if isinstance(failure, LedgerUnavailable):
                            raise
                        rollback(conn)
                        self._label_sets.rolled_back()
                        return [failure]
                    conn.execute("ROLLBACK TO batch")
                    conn.execute("RELEASE batch")
                    self._label_sets.batch_dropped()
                    results.append(failure)
                    continue
                if savepoints:
                    conn.execute("RELEASE batch")
                self._label_sets.batch_kept()
                results.append(result)
                if sums or latency:
                    _merge(sums, b_sums, latency, b_latency)
                else:  # the first batch with new events: its fresh dicts are taken as they are
                    sums, latency = b_sums, b_latency
            new_series, new_latency = self._write_totals(conn, sums, latency)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            self._label_sets.rolled_back()
            raise LedgerUnavailable(f"ledger commit failed: {exc}") from exc
        except BaseException:
            rollback(conn)
            self._label_sets.rolled_back()
            raise
        self._label_sets.committed()
        # Only now, after COMMIT, do the new totals become visible to scrapes. Published
        # objects are replaced, never changed, so readers can share them without copying.
        with self._totals_lock:
            self._totals.series.update(new_series)
            self._totals.latency.update(new_latency)
        self.published = (new_series, new_latency)
        bound_wal(self._wal, self._writer)
        return results

    def _write_batch(self, conn: sqlite3.Connection, batch: Sequence[PricedEvent], now: float
                     ) -> tuple[BatchResult, dict[tuple[SeriesLabels, str], list[Any]],
                                dict[tuple[str, str], LatencyTotals]]:
        seen = self._known_ids(conn, batch)
        written: list[int] = []
        rows: list[object] = []  # the events' values, one row after another
        # Per (labels, outcome): requests, input, cache_read, cache_write, output, reasoning,
        # unpriced, estimated, and the cost (Decimal). Plain lists keyed by the event's own
        # label struct: this loop runs per event; the SeriesKeys and SeriesTotals are built
        # once per commit, in _write_totals.
        sums: dict[tuple[SeriesLabels, str], list[Any]] = {}
        latency: dict[tuple[str, str], LatencyTotals] = {}
        spend: dict[tuple[str, str, int], int] = {}
        spend_rows: list[object] = []  # (department, project, slot, pico), flat
        add_row, add_written = rows.extend, written.append
        label_sets = self._label_sets
        set_ids = label_sets.known
        for position, priced in enumerate(batch):
            ev = priced.event
            rid = ev.request_id
            if rid is not None:
                if rid in seen:
                    continue  # already recorded (or twice in this batch): counted once
                seen.add(rid)
            add_written(position)
            lab, tok, attribution = priced.labels, ev.tokens, ev.attribution
            cost = priced.cost
            ts = ev.timestamp.timestamp()
            department, project, provider, model = (lab.department, lab.project, lab.provider,
                                                    lab.model)
            outcome, seconds, is_priced, estimated = (ev.outcome, ev.latency_seconds,
                                                      priced.priced, ev.estimated)
            t_input, t_read, t_write, t_output, t_reasoning = (
                tok.input, tok.cache_read, tok.cache_write, tok.output, tok.reasoning)
            # Raw values only where the exported label differs (capped to "other"); '' is
            # NULL in label_sets.
            set_key = (lab, "" if attribution.department == department else attribution.department,
                       "" if attribution.project == project else attribution.project,
                       "" if ev.model == model else ev.model, attribution.user or "", outcome,
                       is_priced, priced.price_source, ev.source, estimated)
            set_id = set_ids.get(set_key)
            if set_id is None:
                set_id = label_sets.resolve(conn, set_key)
            add_row((rid, ts, set_id, t_input, t_read, t_write, tok.cache_write_1h, t_output,
                     t_reasoning, str(cost), seconds, now))
            group = (lab, outcome)
            acc = sums.get(group)
            if acc is None:
                # A zero cost is not added (as before): a zero of another exponent ("0.00")
                # would change the stored sum's digits, not its value.
                sums[group] = [1, t_input, t_read, t_write, t_output, t_reasoning,
                               not is_priced, estimated, ZERO + cost if cost else ZERO]
            else:
                acc[0] += 1
                acc[1] += t_input
                acc[2] += t_read
                acc[3] += t_write
                acc[4] += t_output
                acc[5] += t_reasoning
                if not is_priced:
                    acc[6] += 1
                if estimated:
                    acc[7] += 1
                if cost:
                    acc[8] += cost
            if cost:
                slot = (department, project, int(ts // SLOT_SECONDS) * SLOT_SECONDS)
                pico = round(cost * PICO)  # an int, rounded half to even
                if pico >= _SLOT_ROW_MAX:
                    raise ValueOutOfRange(position, "its cost is out of range (over 4.6 million "
                                                    "USD for one call: check its token counts)")
                summed = spend.get(slot, 0) + pico
                if summed >= _SLOT_ROW_MAX:  # keep every bound value inside 64 bits
                    spend_rows.extend((*slot, spend.pop(slot)))
                    summed = pico
                spend[slot] = summed
            if seconds is not None:
                hist = latency.get((provider, model))
                if hist is None:
                    hist = latency[(provider, model)] = LatencyTotals()
                # LatencyTotals.observe inline: per event, a call costs as much as its body.
                hist.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
                hist.total += seconds
                hist.count += 1
        # Plain INSERT: with one writer holding the transaction, the ids above are exactly
        # the new ones; a conflict here would be a bug, and fails the batch loudly.
        sql.EVENTS.insert(conn, rows)
        for slot, pico in spend.items():
            spend_rows.extend(slot)
            spend_rows.append(pico)
        sql.SPEND.insert(conn, spend_rows)
        result = BatchResult(len(written), len(batch) - len(written), tuple(written))
        return result, sums, latency

    @staticmethod
    def _known_ids(conn: sqlite3.Connection, batch: Sequence[PricedEvent]) -> set[str]:
        """Request ids of this batch that the ledger already holds (one query per 500)."""
        ids = [p.event.request_id for p in batch if p.event.request_id is not None]
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            known.update(r[0] for r in conn.execute(
                f"SELECT request_id FROM event_rows WHERE request_id IN ({marks})", chunk))
        return known

    def _write_totals(self, conn: sqlite3.Connection,
                      sums: dict[tuple[SeriesLabels, str], list[Any]],
                      latency: dict[tuple[str, str], LatencyTotals]
                      ) -> tuple[dict[SeriesKey, SeriesTotals],
                                 dict[tuple[str, str], LatencyTotals]]:
        """Write the new running totals; return them, to publish after COMMIT."""
        keys = [SeriesKey(lab.department, lab.project, lab.provider, lab.model, outcome)
                for lab, outcome in sums]
        with self._totals_lock:
            committed_series = [self._totals.series.get(k) or _NO_TOTALS for k in keys]
            committed_latency = {k: self._totals.latency.get(k) for k in latency}
        new_series: dict[SeriesKey, SeriesTotals] = {}
        flat: list[object] = []
        for key, c, acc in zip(keys, committed_series, sums.values(), strict=True):
            # A new object: published totals are replaced, never changed.
            n = new_series[key] = SeriesTotals(
                c.requests + acc[0], c.input + acc[1], c.cache_read + acc[2],
                c.cache_write + acc[3], c.output + acc[4], c.reasoning + acc[5],
                c.unpriced + acc[6], c.cost + acc[8], c.estimated + acc[7])
            flat.extend(key)
            flat.extend((n.requests, n.input, n.cache_read, n.cache_write, n.output,
                         n.reasoning, n.unpriced, str(n.cost), n.estimated))
        sql.TOTALS.insert(conn, flat)
        new_latency: dict[tuple[str, str], LatencyTotals] = {}
        for key2, delta2 in latency.items():
            lat = (committed_latency[key2] or LatencyTotals()).copy()
            lat.add(delta2)
            new_latency[key2] = lat
        conn.executemany(sql.UPSERT_LATENCY, [
            (provider, model, json.dumps(lat.counts), lat.total, lat.count)
            for (provider, model), lat in new_latency.items()])
        return new_series, new_latency

    # -- reads ----------------------------------------------------------------------------
    def totals(self) -> Totals:
        """A consistent snapshot: the dicts are copied, their (immutable-by-convention)
        values shared; a commit replaces values instead of changing them."""
        with self._totals_lock:
            return Totals(series=dict(self._totals.series), latency=dict(self._totals.latency))

    def lookup_key(self, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
        with self._read_lock:
            try:
                return stored_key(self._reader, key)
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"ledger not readable: {exc}") from exc

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal:
        with self._read_lock:
            return read_spend(self._reader, department, project, start, end)

    def check(self) -> None:
        with self._write_lock:
            write_health(self._writer)

    def label_values(self) -> dict[str, set[str]]:
        with self._totals_lock:
            return label_values(list(self._totals.series))

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._checkpointer.close()
            self._reader.close()
            self._writer.close()


def _merge(sums: dict[tuple[SeriesLabels, str], list[Any]],
           more: dict[tuple[SeriesLabels, str], list[Any]],
           latency: dict[tuple[str, str], LatencyTotals],
           more_latency: dict[tuple[str, str], LatencyTotals]) -> None:
    """Add a batch's sums to its commit's (the lists of _write_batch, field by field)."""
    for group, acc in more.items():
        into = sums.get(group)
        if into is None:
            sums[group] = acc
            continue
        into[0] += acc[0]
        into[1] += acc[1]
        into[2] += acc[2]
        into[3] += acc[3]
        into[4] += acc[4]
        into[5] += acc[5]
        into[6] += acc[6]
        into[7] += acc[7]
        into[8] += acc[8]  # both began at ZERO: no digits added by a zero
    for lkey, lvalue in more_latency.items():
        latency.setdefault(lkey, LatencyTotals()).add(lvalue)
