"""Hostile and malformed input (issue #5): nothing crashes the exporter, corrupts its output,
half-writes a batch or creates unbounded series.

Contract (README, Ingest API): 400 when the body is not JSON (NaN/Infinity included), 413
over ingest.max_body_bytes (without reading the rest), 422 naming every bad field with
nothing of the batch written, 202 otherwise; never a 5xx for anything a client can send.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import ExporterProcess, free_port, metric_value
from fixtures.fake_provider import FakeProvider
from helpers.binaries import find_binary
from helpers.robustness import (
    ledger_query,
    proc_status_kib,
    read_response,
    request_head,
    stream_until_answered,
)

CAP = 50  # labels.max_values_per_label in these tests: small, so overflow is reached fast
USAGE_FAMILIES = ("llm_requests_total", "llm_tokens_total", "llm_cost_usd_total",
                  "llm_reasoning_tokens_total", "llm_unpriced_requests_total",
                  "llm_request_duration_seconds", "llm_budget_spend_usd")
EVENT_KEYS = ("request_id", "department", "project", "user", "provider", "model",
              "timestamp", "latency_seconds", "status", "usage", "response", "tokens")
TOKEN_KEYS = ("input", "cache_read", "cache_write", "cache_write_1h", "output", "reasoning")


# -- helpers --------------------------------------------------------------------------------
def _post_raw(exporter: ExporterProcess, body: bytes) -> httpx.Response:
    return httpx.post(f"{exporter.url}/v1/usage", content=body, timeout=30,
                      headers={"Content-Type": "application/json"})


def _usage_lines(exporter: ExporterProcess, http: httpx.Client | None = None) -> list[str]:
    text = http.get(f"{exporter.url}/metrics").text if http else exporter.metrics()
    return sorted(line for line in text.splitlines() if line.startswith(USAGE_FAMILIES))


def _log_size(exporter: ExporterProcess) -> int:
    assert exporter.log_path is not None
    return exporter.log_path.stat().st_size


def _last_traceback(exporter: ExporterProcess, since: int = 0) -> str:
    """The first exception the exporter logged after byte `since` of its log, to put the
    cause in the assertion message. uvicorn logs it just after the 500 went out: poll the
    log briefly (bounded)."""
    assert exporter.log_path is not None
    log_path = exporter.log_path
    deadline = time.monotonic() + 5
    while True:
        with log_path.open("rb") as log:
            log.seek(since)
            for line in log.read().decode(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("exc"):
                    return str(record["exc"])[-1500:]
        if time.monotonic() > deadline:
            return "(no traceback in the exporter log)"
        time.sleep(0.05)


def _assert_no_5xx(exporter: ExporterProcess, r: httpx.Response, what: str,
                   since: int) -> None:
    assert r.status_code < 500, (
        f"EXPORTER BUG: {what} got {r.status_code} {r.text[:200]!r}; exporter log:\n"
        f"{_last_traceback(exporter, since)}")


def _names_a_field_of(field: str, event: Any) -> bool:
    """`field` is a path into `event`: a key it has (however odd: unknown keys are named
    as sent), or a path under an event field (which may be a missing required one)."""
    if isinstance(event, dict) and field in event:
        return True
    root = re.split(r"[.\[]", field, maxsplit=1)[0]
    return root in EVENT_KEYS or (isinstance(event, dict) and root in event)


def _assert_names_the_field(body: Any, answer: httpx.Response) -> None:
    """A 4xx body says what was wrong: `errors[].field` paths into what we sent (or to a
    missing required field) for 422; a message about the body for 400/413."""
    data = answer.json()
    if answer.status_code != 422:
        assert isinstance(data.get("message"), str) and "body" in data["message"], data
        return
    assert isinstance(data.get("errors"), list) and data["errors"], data
    for error in data["errors"]:
        field, message = error.get("field"), error.get("message")
        assert isinstance(field, str) and isinstance(message, str) and message, data
        if field == "body":
            continue
        if not isinstance(body, list):
            assert _names_a_field_of(field, body), f"{field!r} is no field of {body!r:.300}"
            continue
        match = re.match(r"events(?:\[(\d+)\])?(?:\.|$)", field)
        assert match, f"batch error {field!r} does not say which event (events[i])"
        if match.group(1) is not None:
            index = int(match.group(1))
            assert index < len(body), field
            rest = field[match.end():]
            assert not rest or _names_a_field_of(rest, body[index]), field


# -- the exporter most of these tests share ---------------------------------------------------
@pytest.fixture(scope="module")
def hostile_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """One process for all the single-request cases below: it must survive all of them."""
    directory = tmp_path_factory.mktemp("hostile")
    config = directory / "config.yaml"
    config.write_text(json.dumps({"ledger": {"path": str(directory / "ledger.db")},
                                  "labels": {"max_values_per_label": CAP}}))
    exporter = ExporterProcess(config, free_port(), log_path=directory / "exporter.log")
    exporter.start()
    yield exporter
    exporter.stop()


def _event(**fields: Any) -> dict[str, Any]:
    """A valid event with `fields` changed; a field given as None is left out."""
    event = {"provider": "openai", "model": "gpt-4o", "tokens": {"input": 1}, **fields}
    return {k: v for k, v in event.items() if v is not None}


def _sse(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"


def _js(value: Any) -> bytes:
    return json.dumps(value).encode()


LONG = "x" * 10_000
USAGE_OK = {"prompt_tokens": 1, "completion_tokens": 1}

# (id, raw body, the statuses the contract allows, the 422 field expected or None)
HOSTILE: list[tuple[str, bytes, set[int], str | None]] = [
    ("negative tokens", _js(_event(tokens={"input": -1})), {422}, "tokens.input"),
    ("fractional tokens", _js(_event(tokens={"output": 1.5})), {422}, "tokens.output"),
    ("fractional usage", _js(_event(tokens=None, usage={"prompt_tokens": 2.5})), {422},
     "usage.prompt_tokens"),
    ("tokens above 2^63", _js(_event(tokens={"input": 2**64})), {422}, "tokens.input"),
    ("usage above 2^63", _js(_event(tokens=None, usage={"prompt_tokens": 2**63 + 1})), {422},
     "usage.prompt_tokens"),
    ("tokens 1e30 as a float", _js(_event(tokens={"input": 1e30})), {422}, "tokens.input"),
    ("bool as tokens", _js(_event(tokens={"input": True})), {422}, "tokens.input"),
    # 10^12 is the documented maximum (usage.MAX_TOKENS): at $10/M output that is $10M, whose
    # pico-dollars no longer fit a 64-bit SQLite integer. Accepting or refusing it are both
    # fine; a 500 is not.
    ("max tokens on a priced model", _js(_event(tokens={"output": 10**12})), {202, 422},
     None),
    ("5000-digit integer", b'{"provider": "openai", "model": "gpt-4o", "tokens": {"input": '
     + b"9" * 5000 + b"}}", {400, 422}, None),
    ("NaN tokens", b'{"provider": "openai", "model": "gpt-4o", "tokens": {"input": NaN}}',
     {400}, None),
    ("Infinity latency", b'{"provider": "openai", "model": "gpt-4o", "tokens": {"input": 1},'
     b' "latency_seconds": Infinity}', {400}, None),
    ("-Infinity timestamp", b'{"provider": "openai", "model": "gpt-4o", "tokens": {"input":'
     b' 1}, "timestamp": -Infinity}', {400}, None),
    ("quote, brace, backslash labels", _js(_event(
        department='dep"t}', project='a\\b"c}', model='m"}\\', user='u"\\}')), {202}, None),
    ("newline in a label", _js(_event(project="a\nb")), {422}, "project"),
    ("10k-char project", _js(_event(project=LONG)), {422}, "project"),
    ("10k-char model", _js(_event(model=LONG)), {422}, "model"),
    ("10k-char user", _js(_event(user=LONG)), {422}, "user"),
    ("10k-char request_id", _js(_event(request_id=LONG)), {422}, "request_id"),
    ("10k-char provider", _js(_event(provider=LONG)), {422}, "provider"),
    # A model named inside a response body becomes the same label as `model`: the same
    # length and character rules must hold (README: longer label values are refused, 422).
    ("10k-char model in a response body", _js(_event(
        model=None, tokens=None, response={"model": LONG, "usage": USAGE_OK})), {422},
     "response.model|model"),
    ("newline in a response body's model", _js(_event(
        model=None, tokens=None, response={"model": "a\nb", "usage": USAGE_OK})), {422},
     "response.model|model"),
    ("10k-char model in an SSE transcript", _js(_event(
        model=None, tokens=None, response=_sse({"model": LONG, "choices": [],
                                                "usage": USAGE_OK}))), {422}, "response|model"),
    ("object as model in an SSE transcript", _js(_event(
        model=None, tokens=None, response=_sse({"model": {"x": 1}, "choices": [],
                                                "usage": USAGE_OK}))), {422}, "response|model"),
    ("number as model in an SSE transcript", _js(_event(
        model=None, tokens=None, response=_sse({"model": 7, "choices": [],
                                                "usage": USAGE_OK}))), {422}, "response|model"),
    ("deeply nested SSE data", _js(_event(
        tokens=None, response="data: " + "[" * 100_000 + "\n\n")), {422}, "response"),
    ("lone surrogate in a label", b'{"provider": "openai", "model": "gpt-4o", "tokens": '
     b'{"input": 1}, "project": "a\\ud800b"}', {202, 422}, None),
    ("lone surrogate in request_id", b'{"provider": "openai", "model": "gpt-4o", "tokens": '
     b'{"input": 1}, "request_id": "\\udfff"}', {202, 422}, None),
    ("null model and no model in the body", b'{"provider": "openai", "model": null, '
     b'"tokens": {"input": 1}}', {422}, "model"),
    ("unknown provider", _js(_event(provider="acme-llm", model="acme-1")), {202}, None),
    ("provider outside [a-z0-9._-]", _js(_event(provider="open ai!")), {422}, "provider"),
    ("timestamp at year 1 with +14:00", _js(_event(timestamp="0001-01-01T00:00:00+14:00")),
     {422}, "timestamp"),
    ("timestamp at year 9999 with -14:00", _js(_event(timestamp="9999-12-31T23:59:59-14:00")),
     {422}, "timestamp"),
    ("timestamp 1e308", _js(_event(timestamp=1e308)), {422}, "timestamp"),
    ("100k '['", b"[" * 100_000, {400}, None),
    ("100k '[' closed (valid JSON)", b"[" * 100_000 + b"]" * 100_000, {400}, None),
    ("100k nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, {400}, None),
    ("nested garbage as a count", _js(_event(tokens=None, usage={"prompt_tokens": [[[{}]]]})),
     {422}, "usage.prompt_tokens"),
    ("garbage as usage", _js(_event(tokens=None, usage=[1, {"a": None}])), {422}, "usage"),
    ("a JSON string body", b'"hello"', {422}, "body"),
    ("a JSON null body", b"null", {422}, "body"),
    ("an empty body", b"", {400}, None),
    ("not UTF-8", b'{"provider": "\xff\xfe"}', {400}, None),
    ("empty batch", b"[]", {422}, "events"),
    ("batch over max_batch_events", _js([_event()] * 10_001), {422}, "events"),
    ("one bad event sinks its batch", _js([_event(), _event(tokens={"input": -5})]), {422},
     "events[1].tokens.input"),
]


@pytest.mark.parametrize(("body", "allowed", "field"), [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_value_is_answered_without_crash_or_half_write(
        hostile_exporter: ExporterProcess, body: bytes, allowed: set[int],
        field: str | None) -> None:
    before = _usage_lines(hostile_exporter)
    since = _log_size(hostile_exporter)
    r = _post_raw(hostile_exporter, body)
    _assert_no_5xx(hostile_exporter, r, f"body {body[:120]!r}", since)
    assert r.status_code in allowed, (
        f"expected {sorted(allowed)} (README, Ingest API), got {r.status_code}: {r.text[:300]}")
    try:
        sent = json.loads(body)
    except (ValueError, RecursionError):
        sent = None
    if r.status_code in (400, 413, 422):
        _assert_names_the_field(sent, r)
    if field is not None and r.status_code == 422:
        # Any of the `|`-separated names will do (where the fix reports it is its choice).
        named = [e["field"] for e in r.json()["errors"]]
        assert any(n.startswith(tuple(field.split("|"))) for n in named), (field, named)
    if r.status_code != 202:
        assert _usage_lines(hostile_exporter) == before, "a refused request changed counters"
    assert httpx.get(f"{hostile_exporter.url}/healthz", timeout=10).status_code == 200


def test_exposition_stays_valid_and_bounded_after_hostile_labels(
        hostile_exporter: ExporterProcess) -> None:
    promtool = find_binary("promtool")
    hostile = ['q"uote', "br}ace{", "back\\slash", "\\n not a newline", "ünï©ødé",
               "a=b,c=\"d\"", "# HELP x", "x" * 128]
    events = [_event(project=v, department=v, model=v, provider="openai",
                     request_id=f"hostile-{i}") for i, v in enumerate(hostile)]
    since = _log_size(hostile_exporter)
    r = _post_raw(hostile_exporter, _js(events))
    _assert_no_5xx(hostile_exporter, r, "hostile label values", since)
    assert r.status_code == 202, r.text
    text = httpx.get(f"{hostile_exporter.url}/metrics", headers={"Accept": "text/plain"},
                     timeout=10).text
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result
    # promtool reads only the classic format; the OpenMetrics output is checked with
    # prometheus_client's strict OpenMetrics parser instead.
    om = httpx.get(f"{hostile_exporter.url}/metrics", timeout=10,
                   headers={"Accept": "application/openmetrics-text; version=1.0.0"}).text
    om_values = {s.labels.get("project") for f in om_families(om) for s in f.samples
                 if s.name == "llm_requests_total"}
    assert set(hostile) <= om_values
    for value in hostile:  # each came back exactly as sent (escaped on the wire, not mangled)
        assert metric_value(text, "llm_requests_total", project=value, department=value,
                            model=value) is not None, value
    _assert_series_bounded(text)


def _label_values(text: str, family: str, label: str) -> set[str]:
    return {s.labels[label] for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == family and label in s.labels}


def _assert_series_bounded(text: str, known: int = 1) -> None:
    """No guarded label has more than CAP admitted values, plus `other` and the values
    config makes known (the defaults' `unattributed`)."""
    for label in ("department", "project", "provider", "model"):
        values = _label_values(text, "llm_requests_total", label)
        assert len(values - {"other"}) <= CAP + known, (label, len(values))


# -- bodies too large to read ----------------------------------------------------------------
def test_100mb_body_is_refused_without_being_read(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory({})
    assert exporter.proc is not None
    pid = exporter.proc.pid
    peak_before = proc_status_kib(pid, "VmHWM")
    hundred_mb = 100 * 1024 * 1024
    # Declared length: answered from the headers alone, before a single body byte is sent.
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=20) as sock:
        sock.sendall(request_head("POST", "/v1/usage", {
            "Content-Type": "application/json", "Content-Length": str(hundred_mb)}))
        declared = read_response(sock, 20)
    assert declared.status == 413, declared
    assert "body" in declared.json()["message"]
    # No length (chunked), the way a lying client would send it: the server must answer
    # once it has read max_body_bytes (8 MiB), long before we could send 100 MB.
    chunked, sent = stream_until_answered(exporter.port, "/v1/usage", hundred_mb)
    assert chunked.status == 413, chunked
    assert sent < 40 * 1024 * 1024, f"the server let us send {sent >> 20} MiB before 413"
    # Peak resident memory: reading 100 MB would raise it by >= 100 MiB. Slack of 40 MiB
    # covers the 8 MiB it may buffer (twice, when joined) and allocator noise.
    growth = proc_status_kib(pid, "VmHWM") - peak_before
    assert growth < 40 * 1024, f"peak RSS grew by {growth} KiB while refusing 100 MB"
    assert httpx.get(f"{exporter.url}/healthz", timeout=10).status_code == 200
    rejected = metric_value(exporter.metrics(), "llm_exporter_ingest_rejected_total",
                            reason="too_large")
    assert rejected == 2


# -- fuzz ------------------------------------------------------------------------------------
def _garbage() -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little."""
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats() | st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                        max_leaves=8)


COUNTS = st.one_of(
    st.integers(min_value=0, max_value=5000), st.integers(min_value=-3, max_value=-1),
    st.sampled_from([10**12, 10**12 + 1, 2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.floats(), st.booleans(), st.text(max_size=4), _garbage())
LABELS = st.one_of(
    st.sampled_from(["engineering", "ai-features", 'q"uote', "br}ace", "back\\slash",
                     "new\nline", "", " ", "x" * 129, "a\ud800b", "other"]),
    st.text(max_size=30), _garbage())
PROVIDERS = st.one_of(st.sampled_from(["openai", "anthropic", "gemini", "deepseek", "vllm",
                                       "acme", "OpenAI", "bad provider"]), LABELS)
MODELS = st.one_of(st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5",
                                    "gemini-2.5-pro", "no-such-model"]), LABELS)


def _usage_objects() -> st.SearchStrategy[Any]:
    openai_chat = st.fixed_dictionaries({}, optional={
        "prompt_tokens": COUNTS, "completion_tokens": COUNTS,
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": COUNTS})
        | _garbage(),
        "completion_tokens_details": st.fixed_dictionaries(
            {}, optional={"reasoning_tokens": COUNTS}) | _garbage(),
        "prompt_cache_hit_tokens": COUNTS, "prompt_cache_miss_tokens": COUNTS})
    anthropic = st.fixed_dictionaries({"input_tokens": COUNTS}, optional={
        "output_tokens": COUNTS, "cache_read_input_tokens": COUNTS,
        "cache_creation_input_tokens": COUNTS,
        "cache_creation": st.fixed_dictionaries({}, optional={
            "ephemeral_5m_input_tokens": COUNTS, "ephemeral_1h_input_tokens": COUNTS})})
    gemini = st.fixed_dictionaries({"promptTokenCount": COUNTS}, optional={
        "candidatesTokenCount": COUNTS, "cachedContentTokenCount": COUNTS,
        "thoughtsTokenCount": COUNTS, "toolUsePromptTokenCount": COUNTS})
    return openai_chat | anthropic | gemini | _garbage()


def _forms() -> st.SearchStrategy[dict[str, Any]]:
    usage = _usage_objects()
    tokens = st.dictionaries(st.sampled_from([*TOKEN_KEYS, "bogus"]), COUNTS, max_size=4)
    response = st.fixed_dictionaries({"usage": usage}, optional={"model": MODELS})
    sse = st.builds(lambda u, m: _sse({"model": m, "choices": [], "usage": u}), usage, MODELS)
    return st.one_of(
        st.builds(lambda v: {"usage": v}, usage),
        st.builds(lambda v: {"tokens": v}, tokens | _garbage()),
        st.builds(lambda v: {"response": v}, response | sse | _garbage()),
        st.builds(lambda a, b: {"usage": a, "tokens": b}, usage, tokens),  # two forms
        st.just({}))


EVENTS = st.builds(
    lambda base, form, extra: {**base, **form, **extra},
    st.fixed_dictionaries({}, optional={"provider": PROVIDERS, "model": MODELS}),
    _forms(),
    st.fixed_dictionaries({}, optional={
        "request_id": st.uuids().map(str) | LABELS, "department": LABELS, "project": LABELS,
        "user": LABELS,
        "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00",
                                      "9999-12-31T23:59:59-14:00", "2026-13-01T00:00:00Z",
                                      "2026-01-01T00:00:00", "yesterday"]) | _garbage(),
        "latency_seconds": st.floats() | _garbage(),
        "status": st.sampled_from([200, 429, 500, 99, 600, "success", "error", "weird"])
        | _garbage(),
        "surprise": _garbage()}))
BODIES = st.one_of(EVENTS, st.lists(EVENTS, min_size=1, max_size=3), _garbage())


def test_fuzzed_ingest_never_5xx_names_fields_and_never_half_writes(
        exporter_factory: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    ledger = tmp_path / "fuzz.db"
    exporter = exporter_factory({"ledger": {"path": str(ledger)},
                                 "labels": {"max_values_per_label": CAP}})
    accepted = 0
    # One client for every example: building one per request (TLS context and all) would
    # cost more than the exporter's own work.
    http = httpx.Client(timeout=30, headers={"Content-Type": "application/json"})

    # The exporter is started once and shared by every example on purpose: state that one
    # hostile request leaves behind must not break the next.
    @settings(max_examples=300, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=BODIES)
    def one_request(body: Any) -> None:
        nonlocal accepted
        # allow_nan: NaN/Infinity reach the server as the raw text clients might send.
        raw = json.dumps(body, allow_nan=True).encode()
        before = _usage_lines(exporter, http)
        since = _log_size(exporter)
        r = http.post(f"{exporter.url}/v1/usage", content=raw)
        _assert_no_5xx(exporter, r, f"body {raw[:300]!r}", since)
        assert r.status_code in (202, 400, 413, 422), r.text[:300]
        if r.status_code == 202:
            events = body if isinstance(body, list) else [body]
            assert sum(r.json().values()) == len(events)
            accepted += r.json()["accepted"]
        else:
            _assert_names_the_field(body, r)
            assert _usage_lines(exporter, http) == before, "a refused request changed counters"

    with http:
        one_request()
    assert httpx.get(f"{exporter.url}/healthz", timeout=10).status_code == 200
    # Everything acknowledged is in the ledger, nothing else (no half-written batch).
    assert ledger_query(ledger, "SELECT COUNT(*) FROM events") == [(accepted,)]
    text = exporter.metrics()
    total = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "llm_requests_total")
    assert total == accepted
    _assert_series_bounded(text)
    promtool = find_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, b""), result


# -- cardinality -----------------------------------------------------------------------------
# RSS from 10k to 100k distinct projects may grow by 6 MiB at most. Project names have 100
# characters (the label limit is 128), so state leaked per distinct value (a set or dict
# entry holding the name) costs >= ~180 bytes, >= 15 MiB over the 90k values between the two
# measurements; the rest of the exporter's state is bounded (capped label sets, totals of
# <= CAP series). The 6 MiB cover allocator noise (measured: < 1 MiB once warm).
# SQLite's page cache also grows with the ledger (cache_size, 16 MiB per connection at the
# time of writing) until it is full: a warm-up fills it first (events with long request_ids
# to already-admitted projects) until RSS settles, so that it does not count as growth.
RSS_SLACK_KIB = 6 * 1024
INGEST_DISTINCT = 100_000
INGEST_BATCH = 5_000
WARMUP_MAX_BATCHES = 40


def _attack_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}-".ljust(100, "x")


def _rss(exporter: ExporterProcess) -> int:
    assert exporter.proc is not None
    return proc_status_kib(exporter.proc.pid, "VmRSS")


def _warm_up(exporter: ExporterProcess, http: httpx.Client) -> list[int]:
    """Grow the ledger until the process's RSS stops growing (bounded in batches)."""
    samples = [_rss(exporter)]
    for number in range(WARMUP_MAX_BATCHES):
        batch = [{"provider": "openai", "model": "gpt-4o", "department": "engineering",
                  "project": f"warm-{n % CAP:02d}", "tokens": {"input": 1},
                  "request_id": f"warm-{number}-{n}-".ljust(256, "r")}
                 for n in range(INGEST_BATCH)]
        assert http.post(f"{exporter.url}/v1/usage", json=batch).status_code == 202
        samples.append(_rss(exporter))
        if len(samples) > 4 and samples[-1] - samples[-4] < 256:  # 3 batches: < 256 KiB
            return samples
    raise AssertionError(f"RSS did not settle during the warm-up: {samples}")


def test_100k_distinct_projects_through_ingest_stay_capped_with_flat_memory(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory({"labels": {"max_values_per_label": CAP}})
    rss: dict[int, int] = {}
    with httpx.Client(timeout=60) as http:
        warm_up = _warm_up(exporter, http)
        for start in range(0, INGEST_DISTINCT, INGEST_BATCH):
            batch = [{"provider": "openai", "model": "gpt-4o", "department": "engineering",
                      "project": _attack_name("attack", n), "tokens": {"input": 1}}
                     for n in range(start, start + INGEST_BATCH)]
            r = http.post(f"{exporter.url}/v1/usage", json=batch)
            assert r.status_code == 202, r.text[:300]
            rss[start + INGEST_BATCH] = _rss(exporter)
    text = exporter.metrics()
    projects = _label_values(text, "llm_requests_total", "project")
    # The warm-up's CAP names were admitted first: every attacking name became `other`.
    assert projects == {f"warm-{n:02d}" for n in range(CAP)} | {"other"}
    assert metric_value(text, "llm_requests_total", project="other") == INGEST_DISTINCT
    assert metric_value(text, "llm_label_overflow_total", label="project") == INGEST_DISTINCT
    assert len(text) < 200_000  # the scrape itself stays small
    growth = rss[INGEST_DISTINCT] - rss[10_000]
    assert growth < RSS_SLACK_KIB, (
        f"RSS grew {growth} KiB from 10k to 100k distinct projects: {rss} "
        f"(warm-up: {warm_up})")


PROXY_DISTINCT = 2_000
PROXY_THREADS = 4


def test_distinct_projects_through_proxy_headers_stay_capped(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider) -> None:
    fake.reset()
    exporter = exporter_factory({"labels": {"max_values_per_label": CAP}, "upstreams": [
        {"name": "openai", "base_url": fake.url, "format": "openai"}]})
    # Memory is not measured here: a few thousand values would leak too little to see
    # above noise. The proxy maps labels through the same guard and recorder as ingest,
    # whose memory is checked with 100k values above.
    errors: list[str] = []

    def worker(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            for n in range(index, PROXY_DISTINCT, PROXY_THREADS):
                r = http.post(f"{exporter.url}/openai/v1/chat/completions",
                              headers={"X-LLM-Department": "engineering",
                                       "X-LLM-Project": _attack_name("proxy", n),
                                       "Authorization": "Bearer sk-test"},
                              json={"model": "gpt-4o", "messages": [
                                  {"role": "user", "content": "hi"}]})
                if r.status_code != 200:
                    errors.append(f"{n}: {r.status_code} {r.text[:200]}")
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(PROXY_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads) and errors == []
    text = exporter.metrics()
    projects = _label_values(text, "llm_requests_total", "project")
    assert len(projects) == CAP + 1 and "other" in projects
    assert metric_value(text, "llm_requests_total", project="other") == PROXY_DISTINCT - CAP
    assert metric_value(text, "llm_label_overflow_total", label="project") == \
        PROXY_DISTINCT - CAP
    assert len(fake.received) == PROXY_DISTINCT


@pytest.mark.parametrize("model", ["a\ud800b", "m" * 10_000, "a\nb"],
                         ids=["lone surrogate", "10k characters", "newline"])
def test_hostile_model_names_through_the_proxy(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider,
        model: str) -> None:
    """The proxy takes the model from the app's request (and the provider's answer, which
    the fake echoes): a name the ingest API would refuse must neither fail the app's call
    (README: the app's call matters more than our ledger), nor break /metrics, nor become an
    over-long label (README, Security: label values are length-checked)."""
    fake.reset()
    exporter = exporter_factory({"upstreams": [
        {"name": "openai", "base_url": fake.url, "format": "openai"}]})
    # json.dumps escapes the surrogate as \ud800: the bytes on the wire are valid UTF-8.
    # Every problem is collected, so one run reports all of them.
    problems: list[str] = []
    for stream in (False, True):
        body = json.dumps({"model": model, "stream": stream, "messages": []}).encode()
        since = _log_size(exporter)
        try:
            r = httpx.post(f"{exporter.url}/openai/v1/chat/completions", content=body,
                           timeout=30, headers={"Content-Type": "application/json"})
            outcome = f"{r.status_code} {r.text[:100]!r}"
        except httpx.HTTPError as exc:
            outcome = repr(exc)
        if not outcome.startswith("200 "):
            problems.append(f"the proxied call (stream={stream}) failed: {outcome}; "
                            f"exporter log:\n{_last_traceback(exporter, since)}")
    assert len(fake.received) == 2
    since = _log_size(exporter)
    try:
        metrics = httpx.get(f"{exporter.url}/metrics", timeout=30)
        scrape = f"{metrics.status_code}"
    except httpx.HTTPError as exc:  # /metrics is streamed: a failure can cut it off
        scrape = repr(exc)
    if scrape != "200":
        problems.append(f"/metrics fails from now on ({scrape}); exporter log:\n"
                        f"{_last_traceback(exporter, since)}")
    else:
        promtool = find_binary("promtool")
        result = subprocess.run([promtool, "check", "metrics"], input=metrics.content,
                                capture_output=True, timeout=30)
        if (result.returncode, result.stderr) != (0, b""):
            problems.append(f"promtool: {result.stderr!r}")
        bad_labels = {(family.name, name, value)
                      for family in text_string_to_metric_families(metrics.text)
                      for sample in family.samples for name, value in sample.labels.items()
                      if len(value) > 128 or "\n" in value}
        problems += [f"label {name} of {family} is {value[:40]!r} ({len(value)} characters)"
                     for family, name, value in sorted(bad_labels)]
    if httpx.get(f"{exporter.url}/healthz", timeout=10).status_code != 200:
        problems.append("/healthz down")
    if problems:
        pytest.fail(f"EXPORTER BUG with model {model[:20]!r}:\n" + "\n".join(problems))
