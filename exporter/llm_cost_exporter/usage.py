"""Provider usage objects -> disjoint token buckets.

The rules (see docs: provider usage reference):
- OpenAI Chat/Responses/embeddings and Gemini count cached tokens INSIDE the prompt count;
  Anthropic counts cache reads and writes OUTSIDE `input_tokens`.
- Reasoning tokens are inside OpenAI `completion_tokens`/`output_tokens`, but Gemini
  `thoughtsTokenCount` is outside `candidatesTokenCount` (and billed as output).
- Missing or null detail objects count as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_cost_exporter.events import TokenCounts

# A billion tokens in one call is a hundred times the largest context window: anything above
# is an error in the sender. The bound also keeps one call's cost, in pico-dollars, far
# inside a 64-bit integer (1e9 tokens x $600 per 1M = $600,000 = 6e17 pico-USD per bucket).
MAX_TOKENS = 10**9


class UsageError(ValueError):
    """A usage object that cannot be priced; `field` is the dotted path of the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# The helpers take the field's path in two parts (the usage object's path, and the rest
# below it) and join them only to report an error: they run several times per ingested
# event, and building each path up front cost more than the checks themselves.
def _count(obj: Mapping[str, Any], key: str, path: str, sub: str = "") -> int:
    value = obj.get(key)
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{path}{sub}.{key}", "must be a non-negative integer")
    if value > MAX_TOKENS:
        raise UsageError(f"{path}{sub}.{key}", f"must be at most {MAX_TOKENS}")
    return value


def _details(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if type(value) is not dict and not isinstance(value, Mapping):  # dict: no ABC check
        raise UsageError(f"{path}.{key}", "must be an object or null")
    return value


def _not_above(part: int, whole: int, path: str, sub: str, whole_name: str) -> None:
    if part > whole:
        raise UsageError(f"{path}{sub}", f"({part}) exceeds {whole_name} ({whole})")


def detect_format(usage: Mapping[str, Any], provider: str | None = None,
                  path: str = "usage") -> str:
    """Name the usage dialect from its keys; the provider only breaks the one real tie."""
    # Plain `or`s, not any() over a generator: this runs once per ingested event.
    if ("promptTokenCount" in usage or "candidatesTokenCount" in usage
            or "totalTokenCount" in usage):
        return "gemini"
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        return "anthropic"
    if "prompt_tokens" in usage or "prompt_cache_hit_tokens" in usage:
        return "openai_chat"
    if "input_tokens" in usage or "output_tokens" in usage:
        # Anthropic without cache fields and OpenAI Responses look alike; they also price
        # alike then, except that only Responses nests cached tokens in details.
        if provider == "anthropic" or "cache_creation" in usage:
            return "anthropic"
        return "openai_responses"
    raise UsageError(
        path,
        "unrecognised usage object: expected OpenAI (prompt_tokens/input_tokens), "
        "Anthropic (input_tokens, cache_*_input_tokens) or Gemini (promptTokenCount) fields",
    )


def parse_usage(
    usage: Any, provider: str | None = None, path: str = "usage"
) -> TokenCounts:
    if type(usage) is not dict and not isinstance(usage, Mapping):  # dict: no ABC check
        raise UsageError(path, "must be an object")
    fmt = detect_format(usage, provider, path)
    return _PARSERS[fmt](usage, path)


def _openai_chat(u: Mapping[str, Any], path: str) -> TokenCounts:
    prompt = _count(u, "prompt_tokens", path)
    completion = _count(u, "completion_tokens", path)
    prompt_details = _details(u, "prompt_tokens_details", path)
    completion_details = _details(u, "completion_tokens_details", path)
    reasoning = _count(completion_details, "reasoning_tokens", path, ".completion_tokens_details")
    if "prompt_cache_hit_tokens" in u or "prompt_cache_miss_tokens" in u:
        # DeepSeek: hit + miss = prompt_tokens, and these are the numbers it bills.
        cached = _count(u, "prompt_cache_hit_tokens", path)
        miss = _count(u, "prompt_cache_miss_tokens", path)
        if "prompt_tokens" in u and cached + miss != prompt:
            raise UsageError(
                f"{path}.prompt_cache_hit_tokens",
                f"hit ({cached}) + miss ({miss}) must equal prompt_tokens ({prompt})",
            )
        prompt = cached + miss
    else:
        cached = _count(prompt_details, "cached_tokens", path, ".prompt_tokens_details")
    _not_above(cached, prompt, path, ".prompt_tokens_details.cached_tokens", "prompt_tokens")
    _not_above(reasoning, completion, path, ".completion_tokens_details.reasoning_tokens",
               "completion_tokens")
    return TokenCounts(
        input=prompt - cached, cache_read=cached, output=completion, reasoning=reasoning
    )


def _openai_responses(u: Mapping[str, Any], path: str) -> TokenCounts:
    inp = _count(u, "input_tokens", path)
    out = _count(u, "output_tokens", path)
    cached = _count(_details(u, "input_tokens_details", path), "cached_tokens", path,
                    ".input_tokens_details")
    reasoning = _count(_details(u, "output_tokens_details", path), "reasoning_tokens", path,
                       ".output_tokens_details")
    _not_above(cached, inp, path, ".input_tokens_details.cached_tokens", "input_tokens")
    _not_above(reasoning, out, path, ".output_tokens_details.reasoning_tokens", "output_tokens")
    return TokenCounts(input=inp - cached, cache_read=cached, output=out, reasoning=reasoning)


def _anthropic(u: Mapping[str, Any], path: str) -> TokenCounts:
    inp = _count(u, "input_tokens", path)
    write = _count(u, "cache_creation_input_tokens", path)
    read = _count(u, "cache_read_input_tokens", path)
    out = _count(u, "output_tokens", path)
    creation = _details(u, "cache_creation", path)
    write_5m = _count(creation, "ephemeral_5m_input_tokens", path, ".cache_creation")
    write_1h = _count(creation, "ephemeral_1h_input_tokens", path, ".cache_creation")
    if creation and write_5m + write_1h != write:
        raise UsageError(
            f"{path}.cache_creation",
            f"5m ({write_5m}) + 1h ({write_1h}) must equal cache_creation_input_tokens ({write})",
        )
    return TokenCounts(
        input=inp, cache_read=read, cache_write=write, output=out, cache_write_1h=write_1h
    )


def _gemini(u: Mapping[str, Any], path: str) -> TokenCounts:
    prompt = _count(u, "promptTokenCount", path)
    cached = _count(u, "cachedContentTokenCount", path)
    candidates = _count(u, "candidatesTokenCount", path)
    thoughts = _count(u, "thoughtsTokenCount", path)
    # Tool-use prompts are billed as input too (they are not part of promptTokenCount).
    tool_prompt = _count(u, "toolUsePromptTokenCount", path)
    _not_above(cached, prompt, path, ".cachedContentTokenCount", "promptTokenCount")
    return TokenCounts(
        input=prompt - cached + tool_prompt,
        cache_read=cached,
        output=candidates + thoughts,
        reasoning=thoughts,
    )


_PARSERS = {
    "openai_chat": _openai_chat,
    "openai_responses": _openai_responses,
    "anthropic": _anthropic,
    "gemini": _gemini,
}


def parse_response(
    body: Any, provider: str | None = None, path: str = "response"
) -> tuple[str | None, TokenCounts]:
    """A whole provider response body (JSON object) -> (model it names, tokens)."""
    if isinstance(body, str):
        from llm_cost_exporter.streams import parse_transcript

        return parse_transcript(body, provider, path)
    if not isinstance(body, Mapping):
        raise UsageError(path, "must be a provider response object or an SSE transcript string")
    # A Responses-API `response.completed` event wraps the response object.
    if body.get("type") == "response.completed" and isinstance(body.get("response"), Mapping):
        return parse_response(body["response"], provider, f"{path}.response")
    model = body.get("model") or body.get("modelVersion")
    if model is not None and not isinstance(model, str):
        raise UsageError(f"{path}.model", "must be a string")
    if "usageMetadata" in body:
        return model, parse_usage(body["usageMetadata"], provider, f"{path}.usageMetadata")
    if body.get("usage") is not None:
        return model, parse_usage(body["usage"], provider, f"{path}.usage")
    raise UsageError(f"{path}.usage", "response carries no usage (usage or usageMetadata)")
