"""parse_events on its own: the label-value cache never changes what is accepted."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
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


# -- the quick path (_quick_event) against the general one (_parse_event) ------------------

LATEST = NOW + timedelta(seconds=300)
_LABELS_GOOD = ["ops", "  ops  ", "Ops", "ö-team", "o" * 64, "o" * 30]
_LABELS_BAD = ["", "   ", "op\ns", "op\x00s", "o" * 129, "\ud800", 5, 1.5, True, None, ["ops"]]
# Per field: values that pass, and values the general path refuses (or that the quick path
# must leave to it). Items are built from good values, then 0-2 fields get a bad one.
_GOOD: dict[str, list[object]] = {
    "department": _LABELS_GOOD, "project": _LABELS_GOOD, "user": _LABELS_GOOD,
    "provider": ["openai", "OpenAI", " anthropic ", "gemini", "deepseek", "p" * 30],
    "model": ["gpt-4o", " gpt-4o ", "claude-sonnet-4", "m" * 30],
    "request_id": ["r-1", "r" * 256, "a b"],
    "timestamp": ["2026-03-14T11:00:00Z", "2026-03-14T11:00:00.123456Z",
                  "2026-03-14T12:04:59Z", 1773486000, 1773486000.5, 0],
    "latency_seconds": [0, 0.5, 2, 86_400],
    "status": [200, 404, 599, "error", "success", "client_closed"],
    "usage": [{"prompt_tokens": 10, "completion_tokens": 5},
              {"prompt_tokens": 10, "completion_tokens": 5,
               "prompt_tokens_details": {"cached_tokens": 4}},
              {"input_tokens": 7, "output_tokens": 3},
              {"input_tokens": 7, "cache_read_input_tokens": 2, "output_tokens": 1},
              {"promptTokenCount": 3}],
    "tokens": [{"input": 10}, {"input": 1, "output": 2, "reasoning": 1}],
}
_BAD: dict[str, list[object]] = {
    "department": _LABELS_BAD, "project": _LABELS_BAD, "user": _LABELS_BAD,
    "provider": ["open ai", "", "-openai", "x" * 65, 7, "open\x00ai"],
    "model": ["", "m\n", "m" * 129, 4],
    "request_id": ["", "r" * 257, "ré", "\udc80", 12],
    "timestamp": ["2026-03-14T11:00:00z", "2026-03-14T13:00:00+02:00", "2026-03-14T11:00:00",
                  "2026-03-14 11:00:00Z", "2026-03-14T11:00:00+01:00Z", "2026Z03-14T11:00:00Z",
                  "2027-01-01T00:00:00Z", "2026-03-14T12:05:01Z", "Z", "", "not a time",
                  "2026-03-14Z", "20260314Z", "2026-W11-6Z", 10**400,
                  1773486000000, -1, float("nan"), float("inf"), True, 2**70, [1]],
    "latency_seconds": [86_401, -1, float("nan"), True, "1", 10**400],
    "status": [600, 99, True, "ok", 200.0],
    "usage": [{"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
              {"prompt_tokens": -1}, {"prompt_tokens": True}, {"x": 1}, [], 3],
    "tokens": [{"output": 1, "reasoning": 2}, {"input": -1}, {"bogus": 1}, {"input": 10**10},
               "x"],
    "response": [{"model": "gpt-4o", "usage": {"prompt_tokens": 1}}, {}],
    "choices": [[]], "extra": [1],
}


@st.composite
def items(draw: st.DrawFn) -> object:
    item: dict[str, object] = {}
    for key, values in _GOOD.items():
        if key not in ("usage", "tokens") and draw(st.sampled_from([True, True, True, False])):
            item[key] = draw(st.sampled_from(values))
    form = draw(st.sampled_from(["usage", "usage", "tokens"]))
    item[form] = draw(st.sampled_from(_GOOD[form]))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2]))):
        key = draw(st.sampled_from(sorted(_BAD)))
        item[key] = draw(st.sampled_from(_BAD[key]))
    return item


def _general(item: object, limits: IngestLimits) -> object:
    errors = ingest._Collector()
    parsed = ingest._parse_event(item, "", DEFAULTS, NOW, LATEST, limits, errors)
    return parsed if not errors.errors else errors.errors


@settings(max_examples=2000, deadline=None)
@given(items() | st.sampled_from([[], "x", None, {"department": "ops"}]))
@example(event(timestamp="2026-03-14T12:05:01Z"))  # 1 s past the allowed clock skew
@example(event(timestamp="2027-01-01T00:00:00Z"))
@example(event(timestamp="2026-03-14T12:05:00Z"))  # exactly at it: accepted
@example(event(request_id=""))
@example(event(provider="p" * 30))  # a cached value over the 20-character limit
@example(event(timestamp="2026-03-14Z"))  # a date alone: fromisoformat drops the offset
def test_the_quick_path_gives_the_general_paths_event_or_leaves_the_item(item: object
                                                                          ) -> None:
    cold = ingest._quick_event(item, DEFAULTS, NOW, LATEST, 128)
    _general(item, IngestLimits())  # fills the caches the quick path reads
    # Under each limit: shorter ones refuse values the caches hold (filled under 128).
    for max_length, quick in ((128, cold), (128, None), (64, None), (20, None)):
        quick = quick or ingest._quick_event(item, DEFAULTS, NOW, LATEST, max_length)
        if quick is not None:
            # repr: the same field values of the same types (a float is not an int, the
            # time zone is UTC), not merely equal ones.
            assert repr(quick) == repr(_general(item, IngestLimits(max_value_length=max_length)))


def test_the_quick_path_takes_the_common_shapes() -> None:
    # Without this, a quick path that always gave up would pass the test above.
    common = [
        event(department="ops", project="bot", user="u1", request_id="r-1", status=200,
              timestamp="2026-03-14T11:00:00.5Z", latency_seconds=0.8),
        {"provider": "OpenAI", "model": "gpt-4o", "timestamp": 1773486000,
         "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                   "prompt_tokens_details": {"cached_tokens": 4}}},
        {"provider": "anthropic", "model": "claude-sonnet-4", "status": "error",
         "usage": {"input_tokens": 7, "cache_read_input_tokens": 2, "output_tokens": 1}},
    ]
    general = parse_events(common, defaults=DEFAULTS, now=NOW, limits=IngestLimits())
    quick = [ingest._quick_event(i, DEFAULTS, NOW, LATEST, 128) for i in common]
    assert [repr(q) for q in quick] == [repr(g) for g in general]
    assert [q.tokens.cache_read for q in quick if q] == [0, 4, 2]


@pytest.mark.parametrize("field, value, message", [
    ("timestamp", "2026-03-14Z", "must carry a time zone offset (e.g. Z or +07:00)"),
    ("timestamp", "20260314Z", "must carry a time zone offset (e.g. Z or +07:00)"),
    ("timestamp", 10**400, "must be an RFC 3339 string or epoch seconds"),
    ("timestamp", -(10**400), "must be an RFC 3339 string or epoch seconds"),
    ("latency_seconds", 10**400, "must be a number of seconds in [0, 86400]"),
], ids=["date-Z", "basic-date-Z", "ts-1e400", "ts--1e400", "latency-1e400"])
def test_odd_values_are_named_errors_on_both_paths(field: str, value: object,
                                                   message: str) -> None:
    # Twice: the first sight goes through the general path, the second (caches warm)
    # through the quick path first. A date alone ended in a TypeError there (a 500), and a
    # number past 1e308 in math.isfinite's OverflowError on the general path.
    for _ in range(2):
        with pytest.raises(IngestError) as exc:
            parse_events(event(**{field: value}), defaults=DEFAULTS, now=NOW,
                         limits=IngestLimits())
        assert exc.value.errors == [(field, message)]
