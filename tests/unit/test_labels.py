"""LabelGuard: the cardinality cap, reservations settled by the commit, and the cache."""

from __future__ import annotations

from datetime import UTC, datetime

from llm_cost_exporter.events import Attribution, TokenCounts, UsageEvent
from llm_cost_exporter.labels import OVERFLOW, LabelGuard, LabelTicket


def event(project: str, model: str = "gpt-4o") -> UsageEvent:
    return UsageEvent(Attribution("eng", project), "openai", model, TokenCounts(input=1),
                      datetime(2026, 3, 14, tzinfo=UTC))


def label(guard: LabelGuard, *projects: str, written: bool = True) -> list[str]:
    """Label one batch of events and settle it as committed (or not)."""
    ticket = LabelTicket()
    got = [guard.labels_for(event(p), ticket, i).project for i, p in enumerate(projects)]
    guard.settle(ticket, range(len(projects)) if written else ())
    return got


def test_cap_overflow_is_counted_per_written_event_even_for_a_repeated_label_set() -> None:
    guard = LabelGuard(2)
    assert label(guard, "a", "b", "c", "c", "a", "b", "c") == [
        "a", "b", OVERFLOW, OVERFLOW, "a", "b", OVERFLOW]
    assert guard.overflow["project"] == 3
    assert label(guard, "c") == [OVERFLOW]
    assert guard.overflow["project"] == 4
    # A repeated label set that passed is the same object (served from the cache).
    assert guard.labels_for(event("a")) is guard.labels_for(event("a"))


def test_a_batch_that_was_not_written_takes_no_slot_and_counts_no_overflow() -> None:
    guard = LabelGuard(2)
    assert label(guard, "a") == ["a"]
    # Refused, failed or a replay: "b" was only reserved, and is released; "c" overflowed
    # in it, and that is not counted.
    ticket = LabelTicket()
    assert [guard.labels_for(event(p), ticket, i).project
            for i, p in enumerate(("b", "c"))] == ["b", OVERFLOW]
    guard.settle(ticket, ())
    assert guard.overflow["project"] == 0
    assert label(guard, "d") == ["d"]       # the slot "b" held is free again
    assert label(guard, "b") == [OVERFLOW]
    assert guard.overflow["project"] == 1


def test_reservations_of_concurrent_batches_share_the_cap() -> None:
    guard = LabelGuard(2)
    first, second = LabelTicket(), LabelTicket()
    assert guard.labels_for(event("a"), first, 0).project == "a"
    assert guard.labels_for(event("a"), second, 0).project == "a"   # same reserved value
    assert guard.labels_for(event("b"), second, 1).project == "b"
    assert guard.labels_for(event("c"), first, 1).project == OVERFLOW  # a and b hold both
    # The first batch fails; the second commits only its event 1 (event 0 was a duplicate).
    guard.settle(first, ())
    guard.settle(second, [1])
    assert label(guard, "a") == ["a"]       # a was released, then admitted by this batch
    assert label(guard, "c") == [OVERFLOW]  # a and b are admitted: the cap is full
    assert guard.overflow["project"] == 1


def test_reconfigure_drops_cached_answers() -> None:
    guard = LabelGuard(1, known={"project": ["kept"]})
    assert label(guard, "kept") == ["kept"]      # known, cached
    assert label(guard, "first") == ["first"]    # admitted (cap 1)
    guard.reconfigure(1, known={"project": []})
    # "kept" is no longer known and the cap is used up by "first": it now overflows,
    # which a stale cache entry would have hidden.
    assert label(guard, "kept") == [OVERFLOW]
    assert label(guard, "first") == ["first"]
    assert guard.overflow["project"] == 1
