"""Durable storage of priced usage events: the source of truth for every view."""

from llm_cost_exporter.ledger.base import (
    LATENCY_BUCKETS,
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    Ledger,
    LedgerOutcomeUnknown,
    LedgerRejected,
    LedgerUnavailable,
    SeriesKey,
    SeriesTotals,
    Totals,
)

__all__ = ["LATENCY_BUCKETS", "BatchKey", "BatchResult", "IdempotencyConflict", "Ledger",
           "LedgerOutcomeUnknown", "LedgerRejected",
           "LedgerUnavailable", "SeriesKey", "SeriesTotals", "Totals"]
