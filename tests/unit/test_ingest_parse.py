"""parse_events on its own: the label-value cache never changes what is accepted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llm_cost_exporter import ingest
from llm_cost_exporter.events import Attribution
from llm_cost_exporter.ingest import IngestError, IngestLimits, parse_events

NOW = datetime(2026, 3, 14, 12, tzinfo=UTC)
DEFAULTS = Attribution("unattributed", "unattributed")


def event(**fields: object) -> dict[str, object]:
    return {"provider": "openai", "model": "gpt-4o", "tokens": {"input": 10}, **fields}


def test_a_value_cached_under_a_long_limit_is_still_refused_under_a_short_one() -> None:
    name = "x" * 20
    ok = parse_events(event(project=name), defaults=DEFAULTS, now=NOW, limits=IngestLimits())
    assert ok[0].attribution.project == name
    assert name in ingest._CLEAN_LABELS  # cached now
    with pytest.raises(IngestError) as exc:
        parse_events(event(project=name), defaults=DEFAULTS, now=NOW,
                     limits=IngestLimits(max_value_length=10))
    assert exc.value.errors == [("project", "longer than 10 characters")]


def test_cached_values_are_stripped_and_bad_ones_never_cached() -> None:
    first = parse_events([event(department="  ops  "), event(department="  ops  ")],
                         defaults=DEFAULTS, now=NOW, limits=IngestLimits())
    # The second event is a cache hit: the same stripped value as the first (a miss).
    assert [e.attribution.department for e in first] == ["ops", "ops"]
    for bad in ("ops\n", "   ", "op\x00s"):
        with pytest.raises(IngestError) as exc:
            parse_events(event(department=bad), defaults=DEFAULTS, now=NOW,
                         limits=IngestLimits())
        assert exc.value.errors[0][0] == "department"
        assert bad not in ingest._CLEAN_LABELS


def test_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "_CLEAN_LABELS", {})
    monkeypatch.setattr(ingest, "_CLEAN_LABELS_MAX", 50)
    batch = [event(user=f"user-{i}") for i in range(120)]
    parsed = parse_events(batch, defaults=DEFAULTS, now=NOW, limits=IngestLimits())
    assert [e.attribution.user for e in parsed] == [f"user-{i}" for i in range(120)]
    assert len(ingest._CLEAN_LABELS) <= 50


def test_parsed_events_are_immutable() -> None:
    parsed = parse_events(event(), defaults=DEFAULTS, now=NOW, limits=IngestLimits())[0]
    with pytest.raises(AttributeError):
        parsed.model = "gpt-4o-mini"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        parsed.tokens.input = 0  # type: ignore[misc]
    assert (parsed.model, parsed.tokens.input) == ("gpt-4o", 10)
