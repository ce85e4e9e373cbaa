"""The SQLite ledger's write statements (schema version 5, see migrations.py)."""

from __future__ import annotations

from llm_cost_exporter.ledger.sqlite_rows import RowInserter

# The events' own values; their strings are in label_sets (see sqlite_labels.py).
EVENTS = RowInserter("""
INSERT INTO event_rows (request_id, ts, label_set, input, cache_read, cache_write,
    cache_write_1h, output, reasoning, cost_usd, latency_seconds, recorded_at)""", 12)
INSERT_KEY = """
INSERT INTO ingest_keys (key, digest, accepted, duplicates, recorded_at) VALUES (?,?,?,?,?)
"""
TOTALS = RowInserter("""
INSERT INTO totals (department, project, provider, model, outcome, requests, input, cache_read,
    cache_write, output, reasoning, unpriced, cost_usd, estimated)""", 14, """
ON CONFLICT (department, project, provider, model, outcome) DO UPDATE SET
    requests=excluded.requests, input=excluded.input, cache_read=excluded.cache_read,
    cache_write=excluded.cache_write, output=excluded.output, reasoning=excluded.reasoning,
    unpriced=excluded.unpriced, cost_usd=excluded.cost_usd, estimated=excluded.estimated""")
UPSERT_LATENCY = """
INSERT INTO latency_totals (provider, model, counts, total, count) VALUES (?,?,?,?,?)
ON CONFLICT (provider, model) DO UPDATE SET
    counts=excluded.counts, total=excluded.total, count=excluded.count
"""
SPEND = RowInserter(
    "INSERT INTO spend_slots (department, project, slot, cost_pico)", 4,
    "ON CONFLICT (department, project, slot) DO UPDATE SET "
    "cost_pico = cost_pico + excluded.cost_pico")
