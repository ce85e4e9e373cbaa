"""LabelGuard: the cardinality cap, and its cache of label sets that passed whole."""

from __future__ import annotations

from datetime import UTC, datetime

from llm_cost_exporter.events import Attribution, TokenCounts, UsageEvent
from llm_cost_exporter.labels import OVERFLOW, LabelGuard


def event(project: str, model: str = "gpt-4o") -> UsageEvent:
    return UsageEvent(Attribution("eng", project), "openai", model, TokenCounts(input=1),
                      datetime(2026, 3, 14, tzinfo=UTC))


def test_cap_overflow_is_counted_per_event_even_for_a_repeated_label_set() -> None:
    guard = LabelGuard(2)
    got = [guard.labels_for(event(p)).project for p in ("a", "b", "c", "c", "a", "b", "c")]
    assert got == ["a", "b", OVERFLOW, OVERFLOW, "a", "b", OVERFLOW]
    # Every event of the overflowing project counted, not only the first (no caching).
    assert guard.overflow["project"] == 3
    # A repeated label set that passed is the same object (served from the cache).
    assert guard.labels_for(event("a")) is guard.labels_for(event("a"))


def test_reconfigure_drops_cached_answers() -> None:
    guard = LabelGuard(1, known={"project": ["kept"]})
    assert guard.labels_for(event("kept")).project == "kept"      # known, cached
    assert guard.labels_for(event("first")).project == "first"    # admitted (cap 1)
    guard.reconfigure(1, known={"project": []})
    # "kept" is no longer known and the cap is used up by "first": it now overflows,
    # which a stale cache entry would have hidden.
    assert guard.labels_for(event("kept")).project == OVERFLOW
    assert guard.labels_for(event("first")).project == "first"
    assert guard.overflow["project"] == 1
