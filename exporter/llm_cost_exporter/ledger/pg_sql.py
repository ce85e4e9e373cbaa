"""SQL of the PostgreSQL ledger, and what one priced event becomes: an `events` row and
its share of the totals, latency and spend rows."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger.base import LatencyTotals, SeriesKey, SeriesTotals

SLOT_SECONDS = 900
PICO = Decimal("1e12")

SESSION_SETTINGS = (
    # A replica frozen inside a transaction (SIGSTOP, a paused VM) would hold spend-slot row
    # locks and stall every other replica's commits: the server ends such a session.
    "SET idle_in_transaction_session_timeout = '30s'",
    # Nothing may hold the writer (and every ingest request waiting on it) for longer.
    "SET statement_timeout = '30s'",
)

# (name, array type) of every column sent per event, in event_row() order.
_COLUMNS = (
    ("request_id", "text"), ("ts", "timestamptz"), ("department", "text"),
    ("project", "text"), ("provider", "text"), ("model", "text"),
    ("raw_department", "text"), ("raw_project", "text"), ("raw_model", "text"),
    ("user_name", "text"), ("outcome", "text"), ("input", "bigint"),
    ("cache_read", "bigint"), ("cache_write", "bigint"), ("cache_write_1h", "bigint"),
    ("output", "bigint"), ("reasoning", "bigint"), ("cost_usd", "numeric"),
    ("priced", "boolean"), ("price_source", "text"), ("latency_seconds", "float8"),
    ("source", "text"), ("estimated", "boolean"),
)
_NAMES = ", ".join(name for name, _ in _COLUMNS)

# One statement for a whole commit: one array per column, one round trip, one plan.
INSERT_EVENTS = (
    f"INSERT INTO events (instance, {_NAMES}) "
    f"SELECT %s, {_NAMES} FROM unnest("
    + ", ".join(f"%s::{kind}[]" for _, kind in _COLUMNS)
    + f") AS u({_NAMES}) "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)

# The totals, latency and spend of a commit: one statement each (arrays again), queued in
# the same pipeline as the COMMIT. Rows are sorted by key by the caller.
UPSERT_TOTALS = """
INSERT INTO totals AS t (instance, department, project, provider, model, outcome, requests,
    input, cache_read, cache_write, output, reasoning, unpriced, cost_usd, estimated)
SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
    %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],
    %s::bigint[], %s::numeric[], %s::bigint[])
ON CONFLICT (instance, department, project, provider, model, outcome) DO UPDATE SET
    requests = t.requests + excluded.requests, input = t.input + excluded.input,
    cache_read = t.cache_read + excluded.cache_read,
    cache_write = t.cache_write + excluded.cache_write, output = t.output + excluded.output,
    reasoning = t.reasoning + excluded.reasoning, unpriced = t.unpriced + excluded.unpriced,
    cost_usd = t.cost_usd + excluded.cost_usd, estimated = t.estimated + excluded.estimated
"""

# Bucket counts travel as array literals ('{0,1,...}'): unnest would flatten a 2-D array.
UPSERT_LATENCY = """
INSERT INTO latency_totals AS t (instance, provider, model, counts, total, count)
SELECT %s, p, m, c::bigint[], s, n
FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::bigint[]) AS u(p, m, c, s, n)
ON CONFLICT (instance, provider, model) DO UPDATE SET
    counts = ARRAY(SELECT a + b FROM unnest(t.counts, excluded.counts) WITH ORDINALITY
                   AS x(a, b, i) ORDER BY i),
    total = t.total + excluded.total, count = t.count + excluded.count
"""

ADD_SPEND = """
INSERT INTO spend_slots AS s (department, project, slot, cost_pico)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::numeric[])
ON CONFLICT (department, project, slot) DO UPDATE SET cost_pico = s.cost_pico + excluded.cost_pico
"""

# Idempotency-Keys (pg_keys.py): claimed before a batch's events are written, given the
# batch's counts after them, in the batch's savepoint.
CLAIM_KEY = ("INSERT INTO ingest_keys (key, digest, accepted, duplicates, instance)"
             " VALUES (%s, %s, 0, 0, %s) ON CONFLICT (key) DO NOTHING RETURNING key")
READ_KEY = "SELECT digest, accepted, duplicates FROM ingest_keys WHERE key = %s"
SET_KEY_COUNTS = "UPDATE ingest_keys SET accepted = %s, duplicates = %s WHERE key = %s"

LOAD_TOTALS = """
SELECT department, project, provider, model, outcome, requests, input, cache_read,
    cache_write, output, reasoning, unpriced, cost_usd, estimated
FROM totals WHERE instance = %s
"""

LOAD_LATENCY = ("SELECT provider, model, counts, total, count FROM latency_totals"
                " WHERE instance = %s")

WRITE_HEALTH = """
INSERT INTO health (instance, checked_at) VALUES (%s, now())
ON CONFLICT (instance) DO UPDATE SET checked_at = excluded.checked_at
"""


def columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows -> one list per column: the array parameters of an unnest() statement."""
    return [list(col) for col in zip(*rows, strict=True)]


def pg_text(value: str | None) -> str | None:
    """A string as stored: PostgreSQL text cannot hold NUL, so it becomes U+FFFD.

    Request ids and reported model names are not filtered for control characters upstream,
    and refusing the batch with a 503 would only have the client retry it forever.
    """
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _if_differs(raw: str, label: str) -> str | None:
    return raw if raw != label else None


def event_row(priced: PricedEvent) -> tuple[Any, ...]:
    ev, lab, tok = priced.event, priced.labels, priced.event.tokens
    return (
        pg_text(ev.request_id), ev.timestamp, lab.department, lab.project, lab.provider,
        pg_text(lab.model), _if_differs(ev.attribution.department, lab.department),
        _if_differs(ev.attribution.project, lab.project),
        pg_text(_if_differs(ev.model, lab.model)), pg_text(ev.attribution.user), ev.outcome,
        tok.input, tok.cache_read, tok.cache_write, tok.cache_write_1h, tok.output,
        tok.reasoning, priced.cost, priced.priced, pg_text(priced.price_source),
        ev.latency_seconds, ev.source, ev.estimated,
    )


def add_event(priced: PricedEvent, series: dict[SeriesKey, SeriesTotals],
              latency: dict[tuple[str, str], LatencyTotals],
              spend: dict[tuple[str, str, int], int]) -> None:
    """What one new event adds to a commit's totals, latency and spend rows."""
    ev, lab, tok = priced.event, priced.labels, priced.event.tokens
    cost = priced.cost
    key = SeriesKey(lab.department, lab.project, lab.provider, lab.model, ev.outcome)
    series.setdefault(key, SeriesTotals()).add(SeriesTotals(
        1, tok.input, tok.cache_read, tok.cache_write, tok.output, tok.reasoning,
        0 if priced.priced else 1, cost, int(ev.estimated)))
    if ev.latency_seconds is not None:
        latency.setdefault((lab.provider, lab.model), LatencyTotals()).observe(
            ev.latency_seconds)
    if cost:
        # Rounded per event to pico-USD, exactly as the SQLite ledger does.
        pico = int((cost * PICO).to_integral_value(ROUND_HALF_EVEN))
        slot = int(ev.timestamp.timestamp() // SLOT_SECONDS) * SLOT_SECONDS
        spend[(lab.department, lab.project, slot)] = spend.get(
            (lab.department, lab.project, slot), 0) + pico
