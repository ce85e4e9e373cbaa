"""Validate ingest payloads into UsageEvents. Every bad field is named; none is guessed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from llm_cost_exporter.events import OUTCOMES, Attribution, TokenCounts, UsageEvent
from llm_cost_exporter.labels import label_problem
from llm_cost_exporter.usage import MAX_TOKENS, UsageError, parse_response, parse_usage

_EVENT_KEYS = {"request_id", "department", "project", "user", "provider", "model",
               "timestamp", "latency_seconds", "status", "usage", "response", "tokens"}
# Keys that mark a provider's response body (OpenAI, Anthropic, Gemini), not an event.
_RESPONSE_KEYS = {"choices", "candidates", "usageMetadata", "stop_reason", "object", "content"}
_TOKEN_KEYS = ("input", "cache_read", "cache_write", "cache_write_1h", "output", "reasoning")
_PROVIDER = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_REQUEST_ID = 256
# Visible ASCII and spaces: what an HTTP header carries safely (UUIDs, ULIDs, hashes).
_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# A bare key: no space, quote, comma or backslash (a comma is how proxies fold two headers).
_BARE_KEY = re.compile(r'^[\x21\x23-\x2b\x2d-\x5b\x5d-\x7e]+$')
MAX_LATENCY_SECONDS = 86_400.0


@dataclass(frozen=True)
class IngestLimits:
    max_batch_events: int = 10_000
    max_future_seconds: int = 300
    max_value_length: int = 128


class IngestError(ValueError):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))
        self.errors = errors


class _Collector:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append((field, message))


_DECODER = msgspec.json.Decoder()


def decode_body(raw: bytes) -> Any:
    """The request body as JSON values; ValueError or RecursionError when it is not JSON.

    msgspec's decoder first: it builds the same Python values at less than half the cost
    of json.loads (0.52 against 1.17 us per event of a 100-event batch). It accepts only
    strict UTF-8 JSON, so anything it refuses (a lone surrogate escape, UTF-16, a huge
    exponent, NaN, deep nesting) is read again by json.loads, whose answer, and error
    message, are then the ones given: either way a body means what json.loads makes of it.
    """
    try:
        return _DECODER.decode(raw)
    except (ValueError, RecursionError):
        # ValueError, not only msgspec.DecodeError: msgspec before 0.23 raised
        # UnicodeDecodeError for invalid UTF-8 inside a string.
        return json.loads(raw, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_events(body: Any, *, defaults: Attribution, now: datetime,
                 limits: IngestLimits) -> list[UsageEvent]:
    """A JSON value (one event object or a list of them) -> events, or IngestError."""
    if isinstance(body, Mapping):
        items, prefix = [body], None
    elif isinstance(body, list):
        items, prefix = body, "events"
        if not items:
            raise IngestError([("events", "empty batch")])
        if len(items) > limits.max_batch_events:
            raise IngestError([("events", f"more than {limits.max_batch_events} events in one "
                                          "batch: split it")])
    else:
        raise IngestError([("body", "must be an event object or a list of events")])
    errors = _Collector()
    events = []
    latest = now + timedelta(seconds=limits.max_future_seconds)
    max_length = limits.max_value_length
    for i, item in enumerate(items):
        event = _quick_event(item, defaults, now, latest, max_length)
        if event is None:
            path = f"{prefix}[{i}]" if prefix else ""
            event = _parse_event(item, path, defaults, now, latest, limits, errors)
        if event is not None:
            events.append(event)
    if errors.errors:
        raise IngestError(errors.errors)
    return events


def idempotency_key(values: list[str]) -> str | None:
    """The Idempotency-Key header's key (values: every such header of the request), or None.

    Both the IETF draft's form, a structured-field string (`"abc"`, escapes `\\"` and
    `\\\\`, no parameters), and the bare form Stripe's API takes (`abc`) are read, so that
    `"abc"` and `abc` are the same key. Two headers, or two keys folded into one by a proxy
    (`a, b`), are refused rather than guessed between.
    """
    if not values:
        return None
    if len(values) > 1:
        raise IngestError([("Idempotency-Key", "sent more than once: send one key")])
    raw = values[0].strip()
    quoted = raw.startswith('"')
    key = _sf_string(raw) if quoted else raw
    if key is None or not _IDEMPOTENCY_KEY.match(key) or not key.strip() or (
            not quoted and not _BARE_KEY.match(key)):
        raise IngestError([("Idempotency-Key", "must be one key of 1-255 visible ASCII "
                                               "characters, bare or as a quoted string")])
    return key


def _sf_string(raw: str) -> str | None:
    """A structured-field string (RFC 8941 3.3.3) that is the whole value, unescaped."""
    out: list[str] = []
    i = 1
    while i < len(raw):
        char = raw[i]
        if char == "\\":
            if i + 1 == len(raw) or raw[i + 1] not in '"\\':
                return None
            out.append(raw[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(out) if i == len(raw) - 1 else None  # nothing may follow
        out.append(char)
        i += 1
    return None  # no closing quote


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# Label values that passed label_problem (whatever the length limit), mapped to their
# stripped form. Senders repeat a handful of departments, projects and models on every
# event: a dict lookup instead of a regex scan and a strip, per label, per event. Only
# values of up to 64 characters are kept, in at most 10,000 entries: at most about 3.6 MB
# even for 4-byte characters (about 1.3 MB for ASCII), whatever max_value_length allows.
_CLEAN_LABELS: dict[str, str] = {}
_CLEAN_LABELS_MAX = 10_000
_CLEAN_LABEL_CHARS = 64
# The same for providers: a sent value that passed every provider check -> the provider.
_CLEAN_PROVIDERS: dict[str, str] = {}


def _remember(cache: dict[str, str], value: str, clean: str) -> None:
    if len(value) <= _CLEAN_LABEL_CHARS:
        if len(cache) >= _CLEAN_LABELS_MAX:  # bounded: a flood of one-off values
            cache.clear()
        cache[value] = clean


def _label(obj: Mapping[str, Any], key: str, path: str, default: str | None,
           limits: IngestLimits, errors: _Collector) -> str | None:
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is str:
        clean = _CLEAN_LABELS.get(value)
        if clean is not None and len(value) <= limits.max_value_length:
            return clean
    problem = label_problem(value, limits.max_value_length)
    if problem is None:
        clean = value.strip()
        _remember(_CLEAN_LABELS, value, clean)
        return clean
    errors.add(_join(path, key), problem)
    return None


def _quick_event(item: Any, defaults: Attribution, now: datetime, latest: datetime,
                 max_length: int) -> UsageEvent | None:
    """The event of an item in the common shape, or None to leave it to _parse_event.

    What senders repeat on every event (labels seen before, an ASCII request id, a UTC
    timestamp, a usage object or normalized tokens) is checked here in one function, with
    no field paths built and no error list: about half of _parse_event's time. Anything
    else, and every item with a problem, returns None and takes the general path, which
    names the field; an item accepted here gives the event the general path would give
    (tests/unit/test_ingest_parse.py compares the two on generated items).
    """
    if type(item) is not dict or not _EVENT_KEYS.issuperset(item):
        return None
    clean = _CLEAN_LABELS
    get = item.get
    department, project, user = get("department"), get("project"), get("user")
    provider, model = get("provider"), get("model")
    # The same three steps per label, written out rather than a helper called three times:
    # this runs per event, and a Python call costs about as much as the steps themselves.
    if department is None:
        department = defaults.department
    elif type(department) is str and len(department) <= max_length:
        department = clean.get(department)
    else:
        return None
    if project is None:
        project = defaults.project
    elif type(project) is str and len(project) <= max_length:
        project = clean.get(project)
    else:
        return None
    if user is None:
        user = defaults.user
    elif type(user) is str and len(user) <= max_length:
        user = clean.get(user)
        if user is None:
            return None
    else:
        return None
    if (type(provider) is not str or type(model) is not str or len(provider) > max_length
            or len(model) > max_length):
        return None
    provider, model = _CLEAN_PROVIDERS.get(provider), clean.get(model)
    if department is None or project is None or provider is None or model is None:
        return None
    request_id = get("request_id")
    if request_id is not None and not (type(request_id) is str and request_id.isascii()
                                       and 0 < len(request_id) <= MAX_REQUEST_ID):
        return None
    timestamp = get("timestamp")
    if timestamp is None:
        timestamp = now
    elif type(timestamp) is str:
        # Only "...Z" with no other Z: the general path reads every Z and z as +00:00.
        if timestamp[-1:] != "Z" or timestamp.count("Z") != 1 or "z" in timestamp:
            return None
        try:  # Python 3.11 reads the Z itself, as timezone.utc: no astimezone needed
            timestamp = datetime.fromisoformat(timestamp)
        except ValueError:  # among others a date alone ("2026-03-14Z")
            return None
        if timestamp.tzinfo is None:
            return None
    elif type(timestamp) in (int, float) and 0 <= timestamp < 1e11:  # NaN fails too
        timestamp = datetime.fromtimestamp(timestamp, UTC)
    else:
        return None
    if timestamp > latest:
        return None
    latency = get("latency_seconds")
    if latency is not None:
        if type(latency) not in (int, float) or not 0 <= latency <= MAX_LATENCY_SECONDS:
            return None
        latency = float(latency)
    status = get("status")
    if status is None:
        outcome = "success"
    elif type(status) is int and 100 <= status <= 599:
        outcome = "success" if status < 400 else "error"
    elif type(status) is str and status in OUTCOMES:
        outcome = status
    else:
        return None
    usage, tokens = get("usage"), get("tokens")
    if get("response") is not None or (usage is None) == (tokens is None):
        return None
    try:
        counts = (parse_usage(usage, provider) if usage is not None
                  else _normalized(tokens, "tokens"))
    except ValueError:
        return None
    return UsageEvent(
        attribution=Attribution(department=department, project=project, user=user),
        provider=provider, model=model, tokens=counts, timestamp=timestamp, outcome=outcome,
        latency_seconds=latency, request_id=request_id, source="ingest")


def _parse_event(item: Any, path: str, defaults: Attribution, now: datetime,
                 latest: datetime, limits: IngestLimits, errors: _Collector
                 ) -> UsageEvent | None:
    if not isinstance(item, Mapping):
        errors.add(path or "body", "must be an object")
        return None
    before = len(errors.errors)
    if not _EVENT_KEYS.issuperset(item):
        if _RESPONSE_KEYS.intersection(item):
            # A provider response posted as is: say how to wrap it, once, not per field.
            errors.add(path or "body", 'looks like a provider response body: send '
                       '{"provider": ..., "response": <that body>} instead')
            return None
        for key in item:
            if key not in _EVENT_KEYS:
                errors.add(_join(path, str(key)), "unknown field")
    department = _label(item, "department", path, defaults.department, limits, errors)
    project = _label(item, "project", path, defaults.project, limits, errors)
    user = _label(item, "user", path, defaults.user, limits, errors)
    provider = _label(item, "provider", path, None, limits, errors)
    if "provider" not in item:
        errors.add(_join(path, "provider"), "is required")
    elif provider is not None:
        provider = provider.lower()
        if not _PROVIDER.match(provider):
            errors.add(_join(path, "provider"), "must match [a-z0-9][a-z0-9._-]{0,63}")
        else:
            _remember(_CLEAN_PROVIDERS, item["provider"], provider)
    model = _label(item, "model", path, None, limits, errors)
    request_id = item.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id
                                   or len(request_id) > MAX_REQUEST_ID
                                   or _SURROGATE.search(request_id)):
        errors.add(_join(path, "request_id"), f"must be a string of 1-{MAX_REQUEST_ID} "
                                              "valid Unicode characters")
    timestamp = _timestamp(item.get("timestamp"), path, now, latest, limits, errors)
    latency = _latency(item.get("latency_seconds"), path, errors)
    outcome = _outcome(item.get("status"), path, errors)
    tokens, reported_model = _tokens(item, path, provider, errors)
    if model is None and reported_model is not None:
        # A model named inside a response body is held to the same rules as a sent one.
        problem = label_problem(reported_model, limits.max_value_length)
        if problem is None:
            model = reported_model.strip()
        else:
            errors.add(_join(path, "response.model"), problem)
    elif model is None and item.get("model") is None:
        errors.add(_join(path, "model"), "is required (or send a response body that names it)")
    if len(errors.errors) > before:
        return None
    if not (department and project and provider and model and tokens and timestamp):
        errors.add(path or "body", "incomplete event")  # unreachable if the checks above hold
        return None
    return UsageEvent(
        attribution=Attribution(department=department, project=project, user=user),
        provider=provider, model=model, tokens=tokens, timestamp=timestamp,
        outcome=outcome or "success", latency_seconds=latency, request_id=request_id,
        source="ingest",
    )


def _tokens(item: Mapping[str, Any], path: str, provider: str | None,
            errors: _Collector) -> tuple[TokenCounts | None, str | None]:
    forms = [k for k in ("usage", "response", "tokens") if item.get(k) is not None]
    if len(forms) != 1:
        errors.add(_join(path, "usage"), "send exactly one of usage, response or tokens")
        return None, None
    form = forms[0]
    field = _join(path, form)
    try:
        if form == "usage":
            return parse_usage(item["usage"], provider, field), None
        if form == "response":
            model, tokens = parse_response(item["response"], provider, field)
            return tokens, model
        return _normalized(item["tokens"], field), None
    except UsageError as exc:
        errors.add(exc.field, exc.message)
    except ValueError as exc:
        errors.add(field, str(exc))
    return None, None


def _normalized(obj: Any, field: str) -> TokenCounts:
    if not isinstance(obj, Mapping):
        raise UsageError(field, "must be an object")
    values: dict[str, int] = {}
    for key, value in obj.items():
        if key not in _TOKEN_KEYS:
            raise UsageError(f"{field}.{key}", f"unknown token type (allowed: "
                                               f"{', '.join(_TOKEN_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{field}.{key}", "must be a non-negative integer")
        if value > MAX_TOKENS:
            raise UsageError(f"{field}.{key}", f"must be at most {MAX_TOKENS}")
        values[key] = value
    try:
        return TokenCounts(**values)
    except ValueError as exc:
        name = str(exc).split(":", 1)[0]
        raise UsageError(f"{field}.{name}", str(exc).split(": ", 1)[-1]) from None


def _timestamp(value: Any, path: str, now: datetime, latest: datetime, limits: IngestLimits,
               errors: _Collector) -> datetime | None:
    """`latest`: now + the allowed clock skew, computed once per batch."""
    if value is None:
        return now
    field = _join(path, "timestamp")
    ts: datetime | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        # Ranges only (NaN and infinities fail them): math.isfinite raised OverflowError on
        # an int past 1e308, a 500 for a huge JSON number.
        if 0 <= value < 1e11:
            ts = datetime.fromtimestamp(value, UTC)
        elif 1e11 <= value < 1e14:
            errors.add(field, "looks like milliseconds: send epoch seconds")
            return None
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            ts = None
        if ts is not None and ts.tzinfo is None:
            errors.add(field, "must carry a time zone offset (e.g. Z or +07:00)")
            return None
    if ts is None:
        errors.add(field, "must be an RFC 3339 string or epoch seconds")
        return None
    try:
        ts = ts.astimezone(UTC)
    except OverflowError:
        errors.add(field, "is out of range")
        return None
    if ts > latest:
        errors.add(field, f"is more than {limits.max_future_seconds} s in the future")
        return None
    return ts


def _latency(value: Any, path: str, errors: _Collector) -> float | None:
    if value is None:
        return None
    if type(value) in (int, float) and 0 <= value <= MAX_LATENCY_SECONDS:
        return float(value)  # NaN fails the comparison above and takes the slow path
    field = _join(path, "latency_seconds")
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 <= value <= MAX_LATENCY_SECONDS):  # NaN fails it too
        errors.add(field, f"must be a number of seconds in [0, {MAX_LATENCY_SECONDS:g}]")
        return None
    return float(value)


def _outcome(value: Any, path: str, errors: _Collector) -> str | None:
    if value is None:
        return "success"
    field = _join(path, "status")
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return "success" if value < 400 else "error"
    if isinstance(value, str) and value in OUTCOMES:
        return value
    errors.add(field, f"must be an HTTP status code or one of {', '.join(OUTCOMES)}")
    return None
