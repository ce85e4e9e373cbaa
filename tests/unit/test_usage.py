"""Provider usage -> disjoint buckets, on the example payloads of real shape."""

from __future__ import annotations

import pytest

from llm_cost_exporter.events import TokenCounts
from llm_cost_exporter.usage import UsageError, parse_response, parse_usage

from conftest import payload


def test_openai_chat_cached_inside_prompt_and_reasoning_inside_completion() -> None:
    model, tokens = parse_response(payload("openai_chat_cached_reasoning.json"), "openai")
    assert model == "o3-2025-04-16"
    # input = prompt 2000 - cached 1536 = 464; output keeps all 500 (reasoning 320 inside).
    assert tokens == TokenCounts(input=464, cache_read=1536, output=500, reasoning=320)


def test_openai_stream_transcript_uses_final_usage_chunk() -> None:
    model, tokens = parse_response(payload("openai_chat_stream.sse"), "openai")
    assert model == "gpt-4o-mini-2024-07-18"
    assert tokens == TokenCounts(input=12000 - 10240, cache_read=10240, output=800)


def test_openai_responses() -> None:
    model, tokens = parse_response(payload("openai_responses.json"), "openai")
    assert model == "o4-mini-2025-04-16"
    assert tokens == TokenCounts(input=5000 - 4096, cache_read=4096, output=1200, reasoning=1024)


def test_embeddings_are_input_only() -> None:
    model, tokens = parse_response(payload("openai_embeddings.json"), "openai")
    assert (model, tokens) == ("text-embedding-3-small", TokenCounts(input=8000))


def test_anthropic_cache_fields_are_outside_input_tokens() -> None:
    model, tokens = parse_response(payload("anthropic_messages_cache.json"), "anthropic")
    assert model == "claude-sonnet-4-5-20250929"
    assert tokens == TokenCounts(input=40, cache_write=3000, cache_read=12000, output=700)


def test_anthropic_one_hour_cache_writes_are_split_out() -> None:
    _, tokens = parse_response(payload("anthropic_messages_cache_1h.json"), "anthropic")
    assert tokens == TokenCounts(input=100, cache_write=5000, cache_write_1h=4000,
                                 cache_read=20000, output=300)


def test_anthropic_stream_takes_last_cumulative_output_not_the_sum() -> None:
    model, tokens = parse_response(payload("anthropic_stream.sse"), "anthropic")
    assert model == "claude-haiku-4-5-20251001"
    # message_delta sent 150 then 400 (cumulative): output is 400, not 550 nor 401.
    assert tokens == TokenCounts(input=2500, cache_read=50000, output=400)


def test_gemini_thoughts_are_outside_candidates_but_billed_as_output() -> None:
    model, tokens = parse_response(payload("gemini_thoughts_cached.json"), "gemini")
    assert model == "gemini-2.5-pro"
    # input = 10000 - 8000 cached; output = 400 candidates + 1200 thoughts.
    assert tokens == TokenCounts(input=2000, cache_read=8000, output=1600, reasoning=1200)


def test_deepseek_prefers_hit_and_miss_counts() -> None:
    _, tokens = parse_response(payload("deepseek_cache.json"), "deepseek")
    assert tokens == TokenCounts(input=4400, cache_read=25600, output=1000)


def test_missing_or_null_details_count_as_zero() -> None:
    _, tokens = parse_response(payload("vllm_no_details.json"), "vllm")
    assert tokens == TokenCounts(input=1500, output=250)
    assert parse_usage({"prompt_tokens": 10, "completion_tokens": 5,
                        "completion_tokens_details": None}) == TokenCounts(input=10, output=5)


@pytest.mark.parametrize(("usage", "field"), [
    ({"prompt_tokens": -1}, "usage.prompt_tokens"),
    ({"prompt_tokens": 1.5}, "usage.prompt_tokens"),
    ({"prompt_tokens": True}, "usage.prompt_tokens"),
    ({"prompt_tokens": 2**63}, "usage.prompt_tokens"),
    ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
     "usage.prompt_tokens_details.cached_tokens"),
    ({"prompt_tokens": 10, "completion_tokens": 1,
      "completion_tokens_details": {"reasoning_tokens": 2}},
     "usage.completion_tokens_details.reasoning_tokens"),
    ({"prompt_tokens": 10, "prompt_tokens_details": "x"}, "usage.prompt_tokens_details"),
    ({"input_tokens": 1, "cache_creation_input_tokens": 5,
      "cache_creation": {"ephemeral_5m_input_tokens": 1, "ephemeral_1h_input_tokens": 1}},
     "usage.cache_creation"),
    ({"prompt_tokens": 10, "prompt_cache_hit_tokens": 3, "prompt_cache_miss_tokens": 3},
     "usage.prompt_cache_hit_tokens"),
    ({"tokens": 5}, "usage"),
])
def test_bad_usage_names_the_field(usage: dict[str, object], field: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_usage(usage)
    assert err.value.field == field


def test_openai_stream_without_include_usage_is_an_error_not_zero() -> None:
    text = 'data: {"model":"gpt-4o","choices":[],"usage":null}\n\ndata: [DONE]\n\n'
    with pytest.raises(UsageError, match="include_usage"):
        parse_response(text, "openai")
