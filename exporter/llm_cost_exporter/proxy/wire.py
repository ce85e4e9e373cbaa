"""What differs between wire formats: error bodies, key headers, stream options, estimates."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

# Error "type"/"code" values the official SDKs understand for each status we originate.
_OPENAI_TYPES = {400: "invalid_request_error", 407: "invalid_request_error",
                 413: "invalid_request_error", 429: "insufficient_quota", 502: "server_error",
                 504: "server_error"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 407: "authentication_error",
                    413: "request_too_large", 429: "rate_limit_error", 502: "api_error",
                    504: "api_error"}


# Google API error statuses (google.rpc.Code names) for the statuses we originate.
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 407: "UNAUTHENTICATED", 413: "INVALID_ARGUMENT",
                  429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_GEMINI_MODEL = re.compile(r"/models/([^/:]+)")


def error_body(wire_format: str, status: int, code: str, message: str) -> bytes:
    """An error in the shape the provider's own API (and so its SDK) uses."""
    if wire_format == "gemini":
        return json.dumps({"error": {"code": status, "message": message,
                                     "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}).encode()
    if wire_format == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    else:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                          "param": None, "code": code}}
    return json.dumps(body).encode()


def key_header(wire_format: str, api_key: str) -> tuple[bytes, bytes]:
    if wire_format == "anthropic":
        return b"x-api-key", api_key.encode()
    if wire_format == "gemini":
        return b"x-goog-api-key", api_key.encode()
    return b"authorization", b"Bearer " + api_key.encode()


# Headers that carry the client's key: replaced when the upstream has its own key.
KEY_HEADERS = {b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key"}


def model_from_path(path: str) -> str | None:
    """Gemini names the model in the path: /v1beta/models/gemini-2.5-flash:generateContent."""
    match = _GEMINI_MODEL.search(path)
    return match.group(1) if match else None


def without_key_param(query: str) -> str:
    """Drop a client's `key=` query parameter (Gemini) when the upstream has its own key."""
    return "&".join(p for p in query.split("&") if p and not p.startswith("key="))


def wants_usage_injection(wire_format: str, path: str, request: dict[str, Any]) -> bool:
    """An OpenAI chat/completions stream that did not ask for usage: we add the option."""
    if wire_format != "openai" or request.get("stream") is not True:
        return False
    if not path.endswith(("/chat/completions", "/completions")):
        return False
    options = request.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def inject_usage_option(request: dict[str, Any]) -> bytes:
    options = request.get("stream_options")
    request["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}
    return json.dumps(request, separators=(",", ":")).encode()


# With include_usage, OpenAI adds "usage":null to every chunk; a client that did not ask for
# usage never sees that key, so it is taken out again (compact and spaced JSON alike).
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')


def strip_usage_null(data: bytes) -> bytes:
    return _USAGE_NULL.sub(b"", data) if b'"usage"' in data else data


def is_usage_only_chunk(data: dict[str, Any]) -> bool:
    return data.get("choices") == [] and isinstance(data.get("usage"), dict)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in ("image_url", "type", "role", "id", "signature"):
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def estimate_tokens(text_chars: int) -> int:
    """About four characters per token for English text: an estimate, marked as one."""
    return math.ceil(text_chars / 4)


def request_text_chars(request: dict[str, Any] | None) -> int:
    if not request:
        return 0
    parts = [request.get(k) for k in ("messages", "input", "system", "prompt", "instructions",
                                      "contents", "systemInstruction")]
    return sum(len(s) for s in _strings(parts))


def delta_text_chars(event: dict[str, Any]) -> int:
    """Characters of generated text in one stream event, whatever the format."""
    kind = event.get("type")
    if kind == "content_block_delta":  # Anthropic
        delta = event.get("delta") or {}
        return sum(len(delta.get(k) or "") for k in ("text", "partial_json", "thinking"))
    if isinstance(kind, str) and kind.endswith(".delta"):  # OpenAI Responses
        delta = event.get("delta")
        return len(delta) if isinstance(delta, str) else 0
    total = 0
    for candidate in event.get("candidates") or ():  # Gemini
        for part in (candidate.get("content") or {}).get("parts") or ():
            total += len(part.get("text") or "")
    for choice in event.get("choices") or ():  # OpenAI chat
        delta = choice.get("delta") or {}
        total += len(delta.get("content") or "") + len(delta.get("reasoning_content") or "")
        for call in delta.get("tool_calls") or ():
            total += len((call.get("function") or {}).get("arguments") or "")
    return total
