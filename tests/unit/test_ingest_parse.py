"""parse_events on its own: the label-value cache never changes what is accepted."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _same(a: object, b: object) -> bool:
    """Equal values of the very same types, all the way down (1 is not 1.0 nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(  # type: ignore[arg-type]
            _same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _reference(raw: bytes) -> object:
    return json.loads(raw, parse_constant=ingest._reject_constant)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_decode_body_reads_json_as_json_loads_does(value: object, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assert _same(ingest.decode_body(raw), _reference(raw))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | st.sampled_from([
    b'["\\ud800"]', b'["\\ud83d\\ude00"]', b'[1e999]', b'[NaN]', b'[-Infinity]',
    b'{"a": 1, "a": 2}', b'[123456789012345678901234567890]', b'\xef\xbb\xbf[1]',
    '[1]'.encode("utf-16"), b'["\xed\xa0\x80"]', b'[1.0, -0.0, 1E2]', b'  [ ]  ', b'[1,]']))
def test_decode_body_agrees_with_json_loads_on_any_bytes(raw: bytes) -> None:
    try:
        expected = _reference(raw)
    except (ValueError, RecursionError) as exc:
        with pytest.raises(type(exc)):
            ingest.decode_body(raw)
        return
    assert _same(ingest.decode_body(raw), expected)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(RecursionError):
        ingest.decode_body(b"[" * 200_000)


def test_only_short_values_are_cached() -> None:
    long_value = "p" * 65
    parsed = parse_events(event(project=long_value), defaults=DEFAULTS, now=NOW,
                          limits=IngestLimits())
    assert parsed[0].attribution.project == long_value
    assert long_value not in ingest._CLEAN_LABELS  # accepted, but not kept: memory bound
    assert "p" * 64 not in ingest._CLEAN_LABELS


def test_invalid_utf8_inside_a_string_is_read_by_json_loads(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    # msgspec before 0.23 raised UnicodeDecodeError here rather than its DecodeError.
    class OldDecoder:
        def decode(self, raw: bytes) -> object:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "invalid start byte")

    monkeypatch.setattr(ingest, "_DECODER", OldDecoder())
    raw = '{"department": "\udc80"}'.encode("utf-8", "surrogatepass")
    assert ingest.decode_body(raw) == {"department": "\udc80"}  # json.loads's reading
