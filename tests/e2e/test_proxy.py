"""The sidecar proxy driven by the official openai and anthropic SDKs, against a fake provider.

Expected costs (list prices of the pinned genai-prices, USD per 1M tokens):
- gpt-4o (2.50 / 1.25 cached / 10): fake usage prompt 2000 (1536 cached), completion 500
  -> 464×2.5 + 1536×1.25 + 500×10 = 0.00116 + 0.00192 + 0.005 = 0.00808
- o4-mini (1.10 / 0.275 / 4.40), same usage through the Responses API
  -> 464×1.1 + 1536×0.275 + 500×4.4 = 0.0005104 + 0.0004224 + 0.0022 = 0.0031328
- claude-sonnet-4-5 (3 / 3.75 write / 0.30 read / 15): input 40, write 3000, read 12000, out 700
  -> 0.00012 + 0.01125 + 0.0036 + 0.0105 = 0.02547
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from llm_cost_exporter.clock import FixedClock

from conftest import free_port, metric_value, wait_until
from fixtures.fake_provider import PIECES, FakeProvider
from fixtures.inproc import InProcessExporter, start_exporter

GPT4O = 0.00808
O4_MINI = 0.0031328
SONNET = 0.02547
TEAM = {"X-LLM-Department": "engineering", "X-LLM-Project": "ai-features"}
SERIES = {"department": "engineering", "project": "ai-features"}


@pytest.fixture
def proxy_clock() -> FixedClock:
    return FixedClock(datetime(2026, 3, 14, 12, 0, tzinfo=UTC))


@pytest.fixture
def start(fake: FakeProvider, tmp_path: Path, proxy_clock: FixedClock
          ) -> Iterator[Callable[..., InProcessExporter]]:
    fake.reset()
    started: list[InProcessExporter] = []

    def make(extra: dict[str, Any] | None = None, upstreams: list[dict[str, Any]] | None = None,
             env: dict[str, str] | None = None) -> InProcessExporter:
        config = {
            "upstreams": upstreams or [
                {"name": "openai", "base_url": fake.url, "format": "openai"},
                {"name": "anthropic", "base_url": fake.url, "format": "anthropic"}],
            "budgets": [{"department": "engineering", "project": "ai-features",
                         "daily_usd": 300, "monthly_usd": 5000}],
            **(extra or {}),
        }
        exporter = start_exporter(config, tmp_path, proxy_clock, env=env)
        started.append(exporter)
        return exporter

    yield make
    for exporter in started:
        exporter.stop()


def oai(exporter: InProcessExporter, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{exporter.url}/openai/v1", api_key="sk-client-key",
                         default_headers=TEAM, max_retries=0, **kwargs)


def claude(exporter: InProcessExporter) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{exporter.url}/anthropic", api_key="sk-ant-client",
                               default_headers=TEAM, max_retries=0)


def cost(exporter: InProcessExporter, model: str, provider: str = "openai") -> float | None:
    return metric_value(exporter.metrics(), "llm_cost_usd_total", **SERIES, provider=provider,
                        model=model)


def requests(exporter: InProcessExporter, outcome: str, model: str | None = None) -> float:
    labels = {**SERIES, "outcome": outcome, **({"model": model} if model else {})}
    return metric_value(exporter.metrics(), "llm_requests_total", **labels) or 0


MESSAGES = [{"role": "user", "content": "How much did we spend?"}]


def sk_ant_key(headers: dict[str, str]) -> str | None:
    return headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")


def sent_chunks(fake: FakeProvider) -> list[dict[str, Any]]:
    return [json.loads(e[len(b"data: "):]) for e in fake.sent if e != b"data: [DONE]\n\n"]


# -- OpenAI ---------------------------------------------------------------------------------
def test_openai_sync_json(start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()
    answer = oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.choices[0].message.content == "".join(PIECES)
    assert answer.usage is not None and answer.usage.prompt_tokens == 2000
    assert cost(exporter, "gpt-4o") == GPT4O
    upstream = fake.received[-1]
    assert upstream.path == "/v1/chat/completions"
    assert upstream.headers["authorization"] == "Bearer sk-client-key"
    assert not any(h.lower().startswith("x-llm-") for h in upstream.headers)
    assert upstream.json == {"model": "gpt-4o", "messages": MESSAGES}


def test_openai_stream_without_usage_option_sees_exactly_its_stream(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()
    chunks = list(oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                        stream=True))
    # We asked upstream for usage on the client's behalf...
    assert fake.received[-1].json["stream_options"] == {"include_usage": True}
    # ...but the client gets the stream it asked for: no usage chunk, no "usage" keys.
    expected = [{k: v for k, v in c.items() if k != "usage"} for c in sent_chunks(fake)
                if c["choices"]]
    assert [c.to_dict() for c in chunks] == expected
    assert len(chunks) == len(PIECES) + 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(PIECES)
    assert cost(exporter, "gpt-4o") == GPT4O


def test_openai_async_stream_with_usage_option_passes_usage_through(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{exporter.url}/openai/v1", api_key="sk-x",
                                    default_headers=TEAM, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        out = [chunk async for chunk in stream]
        await client.close()
        return out

    chunks = asyncio.run(run())
    assert [c.to_dict() for c in chunks] == sent_chunks(fake)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 500
    assert cost(exporter, "gpt-4o") == GPT4O


def test_openai_async_json(start: Callable[..., InProcessExporter]) -> None:
    exporter = start()

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{exporter.url}/openai/v1", api_key="sk-x",
                                    default_headers=TEAM, max_retries=0)
        await asyncio.gather(*(client.chat.completions.create(model="gpt-4o",
                                                              messages=MESSAGES)
                               for _ in range(5)))
        await client.close()

    asyncio.run(run())
    assert cost(exporter, "gpt-4o") == pytest.approx(5 * GPT4O, rel=1e-12)
    assert requests(exporter, "success", "gpt-4o") == 5


def test_openai_responses_json_and_stream(start: Callable[..., InProcessExporter],
                                          fake: FakeProvider) -> None:
    exporter = start()
    client = oai(exporter)
    answer = client.responses.create(model="o4-mini", input="How much did we spend?")
    assert answer.output_text == "".join(PIECES)
    events = list(client.responses.create(model="o4-mini", input="again", stream=True))
    assert [e.type for e in events][-1] == "response.completed"
    assert len(events) == len(fake.sent)
    assert cost(exporter, "o4-mini") == pytest.approx(2 * O4_MINI, rel=1e-12)


def test_stream_arrives_incrementally(start: Callable[..., InProcessExporter],
                                      fake: FakeProvider) -> None:
    exporter = start()
    fake.hold_last = threading.Event()
    stream = oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                   stream=True)
    first = next(iter(stream))
    # The client holds the first chunk while the provider has not sent its last event.
    assert first.choices[0].delta.role == "assistant"
    assert not fake.stream_finished.is_set()
    fake.hold_last.set()
    rest = list(stream)
    assert len(rest) == len(PIECES) + 1
    wait_until(lambda: fake.stream_finished.is_set(), 5, "the provider to finish")
    # The SDK stops reading at [DONE]; the proxy records right after: poll, bounded.
    wait_until(lambda: metric_value(exporter.metrics(),
                                    "llm_proxy_time_to_first_token_seconds_count",
                                    provider="openai", model="gpt-4o") == 1, 5,
               "time to first token to be observed")


# -- Anthropic ------------------------------------------------------------------------------
def test_anthropic_sync_json_and_stream(start: Callable[..., InProcessExporter],
                                        fake: FakeProvider) -> None:
    exporter = start()
    client = claude(exporter)
    message = client.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=1024,
                                     messages=MESSAGES)
    assert message.usage.cache_read_input_tokens == 12000
    # Whichever key header this SDK version sends reaches the provider unchanged.
    sent = fake.received[-1].headers
    assert sk_ant_key(sent) == "sk-ant-client"
    with client.messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=1024,
                                messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(PIECES)
    assert final.usage.output_tokens == 700
    assert cost(exporter, "claude-sonnet-4-5-20250929", "anthropic") == pytest.approx(
        2 * SONNET, rel=1e-12)
    tokens = metric_value(exporter.metrics(), "llm_tokens_total", **SERIES,
                          provider="anthropic", token_type="cache_write")
    assert tokens == 6000


def test_anthropic_async_stream(start: Callable[..., InProcessExporter]) -> None:
    exporter = start()

    async def run() -> int:
        client = anthropic.AsyncAnthropic(base_url=f"{exporter.url}/anthropic", api_key="k",
                                          default_headers=TEAM, max_retries=0)
        stream = await client.messages.create(model="claude-sonnet-4-5-20250929",
                                              max_tokens=64, messages=MESSAGES, stream=True)
        n = len([event async for event in stream])
        await client.close()
        return n

    # start, block start, 5 deltas, block stop, delta, stop: the SDK hides the ping event.
    assert asyncio.run(run()) == 10
    assert cost(exporter, "claude-sonnet-4-5-20250929", "anthropic") == SONNET


# -- Gemini (no official SDK in the test deps: plain HTTP, as the REST docs show) -----------
GEMINI = "/gemini/v1beta/models/gemini-2.5-pro"
# Gemini 2.5 Pro (1.25 / 0.125 cached / 10): prompt 10000 (8000 cached), 400 + 1200 thoughts
# -> 2000×1.25 + 8000×0.125 + 1600×10 = 0.0025 + 0.001 + 0.016 = 0.0195
GEMINI_PRO = 0.0195


def test_gemini_json_and_sse_stream_with_upstream_key(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start(upstreams=[{"name": "gemini", "base_url": fake.url, "format": "gemini",
                                 "api_key_env": "GEMINI_KEY"}], env={"GEMINI_KEY": "g-upstream"})
    body = {"contents": [{"role": "user", "parts": [{"text": "How much did we spend?"}]}]}
    r = httpx.post(f"{exporter.url}{GEMINI}:generateContent?key=g-client", json=body,
                   headers=TEAM)
    assert r.json()["usageMetadata"]["thoughtsTokenCount"] == 1200
    # The client's key (query parameter) is replaced by the upstream's own (header).
    assert (fake.received[-1].query, fake.received[-1].headers["x-goog-api-key"]) == (
        "", "g-upstream")
    with httpx.stream("POST", f"{exporter.url}{GEMINI}:streamGenerateContent?alt=sse",
                      json=body, headers=TEAM) as stream:
        raw = b"".join(stream.iter_raw())
    assert raw == b"".join(fake.sent)  # byte for byte, CRLF separators included
    assert fake.received[-1].query == "alt=sse"
    assert cost(exporter, "gemini-2.5-pro", "gemini") == pytest.approx(2 * GEMINI_PRO,
                                                                        rel=1e-12)
    assert metric_value(exporter.metrics(), "llm_reasoning_tokens_total", **SERIES,
                        provider="gemini") == 2400


# -- faults ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "error", "status_class"), [
    ("error500", openai.InternalServerError, "5xx"),
    ("error400", openai.BadRequestError, "4xx"),
])
def test_upstream_errors_pass_through(start: Callable[..., InProcessExporter],
                                      fake: FakeProvider, mode: str, error: type,
                                      status_class: str) -> None:
    exporter = start()
    fake.mode = mode
    with pytest.raises(error) as raised:
        oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.body == {"message": "fake failure", "type": raised.value.body["type"],
                                 "param": None, "code": None}
    assert requests(exporter, "error", "gpt-4o") == 1
    assert metric_value(exporter.metrics(), "llm_proxy_upstream_errors_total",
                        provider="openai", status_class=status_class) == 1


def test_unreachable_is_502_and_timeout_is_504(start: Callable[..., InProcessExporter],
                                               fake: FakeProvider) -> None:
    exporter = start(upstreams=[
        {"name": "down", "base_url": f"http://127.0.0.1:{free_port()}", "format": "openai",
         "provider": "openai"},
        {"name": "slow", "base_url": fake.url, "format": "anthropic", "provider": "anthropic",
         "timeout_seconds": 0.5}])
    client = openai.OpenAI(base_url=f"{exporter.url}/down/v1", api_key="k", max_retries=0,
                           default_headers=TEAM)
    with pytest.raises(openai.APIStatusError) as down:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert down.value.status_code == 502
    assert down.value.body["code"] == "upstream_unreachable"
    fake.mode = "hang"
    slow = anthropic.Anthropic(base_url=f"{exporter.url}/slow", api_key="k", max_retries=0,
                               default_headers=TEAM)
    with pytest.raises(anthropic.APIStatusError) as timeout:
        slow.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=MESSAGES)
    assert timeout.value.status_code == 504
    assert timeout.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "upstream slow did not answer in time"}}
    text = exporter.metrics()
    for status_class in ("unreachable", "timeout"):
        provider = "openai" if status_class == "unreachable" else "anthropic"
        assert metric_value(text, "llm_proxy_upstream_errors_total", provider=provider,
                            status_class=status_class) == 1


def test_client_disconnect_closes_upstream_and_records_client_closed(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()
    fake.chunk_delay = 0.2
    stream = oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                   stream=True)
    next(iter(stream))
    stream.close()
    wait_until(fake.stream_cancelled.is_set, 10, "the upstream request to be closed")
    wait_until(lambda: requests(exporter, "client_closed", "gpt-4o") == 1, 10,
               "the call to be recorded as client_closed")
    assert not fake.stream_finished.is_set()


def test_stream_without_usage_is_estimated_never_zero(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()
    fake.mode = "no_usage"
    with claude(exporter).messages.stream(model="claude-sonnet-4-5-20250929", max_tokens=64,
                                          messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "".join(PIECES)
    # Input side from message_start (exact); output from 23 characters of text -> 6 tokens:
    # 40×3 + 3000×3.75 + 12000×0.30 + 6×15 = 0.00012 + 0.01125 + 0.0036 + 0.00009 = 0.01506
    assert cost(exporter, "claude-sonnet-4-5-20250929", "anthropic") == 0.01506
    assert metric_value(exporter.metrics(), "llm_estimated_requests_total", **SERIES,
                        provider="anthropic") == 1
    # An OpenAI stream with no usage at all: both sides estimated from text. The request's
    # text is 22 characters -> 6 tokens; output 23 characters -> 6 tokens:
    # 6×2.5 + 6×10 = 0.000015 + 0.00006 = 0.000075
    list(oai(exporter).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert cost(exporter, "gpt-4o") == 0.000075


# -- attribution, keys, routing -------------------------------------------------------------
def test_upstream_key_replaces_client_key_and_defaults_attribute(
        start: Callable[..., InProcessExporter], fake: FakeProvider, tmp_path: Path) -> None:
    exporter = start(upstreams=[{"name": "openai", "base_url": fake.url,
                                 "api_key_env": "UPSTREAM_KEY"}],
                     extra={"defaults": {"department": "platform", "project": "sidecar"}},
                     env={"UPSTREAM_KEY": "sk-upstream-secret"})
    client = openai.OpenAI(base_url=f"{exporter.url}/openai/v1", api_key="sk-app-key",
                           max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert fake.received[-1].headers["authorization"] == "Bearer sk-upstream-secret"
    text = exporter.metrics()
    assert metric_value(text, "llm_cost_usd_total", department="platform", project="sidecar",
                        model="gpt-4o") == GPT4O
    assert "sk-upstream-secret" not in text and "sk-app-key" not in text
    assert "sk-upstream-secret" not in (tmp_path / "proxy-ledger.db").read_bytes().decode(
        "latin-1")


def test_query_string_passes_and_unknown_prefix_is_not_proxied(
        start: Callable[..., InProcessExporter], fake: FakeProvider) -> None:
    exporter = start()
    r = httpx.get(f"{exporter.url}/openai/v1/models?limit=5", headers=TEAM)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "gpt-4o"
    assert (fake.received[-1].path, fake.received[-1].query) == ("/v1/models", "limit=5")
    assert httpx.get(f"{exporter.url}/elsewhere/v1/models").status_code == 404
    # Listing models is not an LLM call: nothing recorded.
    assert metric_value(exporter.metrics(), "llm_requests_total", **SERIES) is None


def test_bad_attribution_header_is_refused(start: Callable[..., InProcessExporter]) -> None:
    exporter = start()
    r = httpx.post(f"{exporter.url}/openai/v1/chat/completions",
                   headers={"X-LLM-Project": "x" * 200}, json={"model": "gpt-4o"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("header X-LLM-Project:")


# -- budget enforcement ---------------------------------------------------------------------
def test_enforcement_blocks_at_limit_and_lets_through_after_rollover(
        start: Callable[..., InProcessExporter], fake: FakeProvider,
        proxy_clock: FixedClock) -> None:
    exporter = start(extra={"budgets": [
        {"department": "engineering", "project": "ai-features", "daily_usd": 0.01,
         "enforce": True}]})
    client = oai(exporter)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # spend 0.00808
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # 0.01616 >= 0.01
    with pytest.raises(openai.RateLimitError) as blocked:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert blocked.value.response.headers["retry-after"] == str(12 * 3600)  # to midnight UTC
    assert blocked.value.body["code"] == "budget_exceeded"
    assert len(fake.received) == 2  # the blocked call never reached the provider
    claude_client = claude(exporter)
    with pytest.raises(anthropic.RateLimitError):
        claude_client.messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                      messages=MESSAGES)
    assert metric_value(exporter.metrics(), "llm_requests_blocked_total", **SERIES) == 2
    # Another project of the department is not limited by this project's budget.
    other = openai.OpenAI(base_url=f"{exporter.url}/openai/v1", api_key="k", max_retries=0,
                          default_headers={**TEAM, "X-LLM-Project": "search"})
    other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    proxy_clock.set(datetime(2026, 3, 15, 0, 0, 1, tzinfo=UTC))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(fake.received) == 4

