"""The PostgreSQL ledger's bookkeeping of one commit: which events of each batch are new, and
what they add to the running totals, latency and spend (pure functions, no database)."""

from __future__ import annotations

from collections.abc import Sequence

from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger.base import (
    BatchResult,
    LatencyTotals,
    SeriesKey,
    SeriesTotals,
    Totals,
)
from llm_cost_exporter.ledger.pg_sql import add_event, pg_text

Delta = tuple[dict[SeriesKey, SeriesTotals], dict[tuple[str, str], LatencyTotals],
              dict[tuple[str, str, int], int]]


def pick(batch: Sequence[PricedEvent], plan: list[bool]) -> list[PricedEvent]:
    return [p for p, maybe_new in zip(batch, plan, strict=True) if maybe_new]


def new_positions(batch: Sequence[PricedEvent], plan: list[bool],
                  inserted: set[str]) -> list[int]:
    """Positions of the new events: inserted here, or without request_id (a request_id
    already recorded, by any replica or earlier in this commit, is counted once)."""
    rids = (pg_text(priced.event.request_id) for priced in batch)
    return [position for position, (rid, maybe_new) in enumerate(zip(rids, plan, strict=True))
            if maybe_new and (rid is None or rid in inserted)]


def tally(batches: Sequence[Sequence[PricedEvent]], plans: list[list[bool]],
          outcomes: Sequence[set[str] | BatchResult | Exception]
          ) -> tuple[list[BatchResult | Exception], Delta]:
    """Per batch: which events were new (inserted here) and what they add to the totals."""
    results: list[BatchResult | Exception] = []
    series: dict[SeriesKey, SeriesTotals] = {}
    latency: dict[tuple[str, str], LatencyTotals] = {}
    spend: dict[tuple[str, str, int], int] = {}
    for batch, plan, inserted in zip(batches, plans, outcomes, strict=True):
        if not isinstance(inserted, set):  # a failure or a replay: adds nothing
            results.append(inserted)
            continue
        written = new_positions(batch, plan, inserted)
        for position in written:
            add_event(batch[position], series, latency, spend)
        results.append(BatchResult(len(written), len(batch) - len(written), tuple(written)))
    return results, (series, latency, spend)


def merge(totals: Totals, delta: Delta) -> None:
    """Publish a commit: new value objects, so snapshots handed out stay unchanged."""
    series, latency, _ = delta
    for key, value in series.items():
        new = (totals.series.get(key) or SeriesTotals()).copy()
        new.add(value)
        totals.series[key] = new
    for lkey, lvalue in latency.items():
        lat = (totals.latency.get(lkey) or LatencyTotals()).copy()
        lat.add(lvalue)
        totals.latency[lkey] = lat
