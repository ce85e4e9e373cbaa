"""Usage from streamed (Server-Sent Events) responses.

Each provider reports streamed usage differently:
- OpenAI Chat: the last chunk before `[DONE]` carries `usage` (only when the request set
  `stream_options.include_usage`); earlier chunks have `"usage": null`.
- OpenAI Responses: `response.completed` carries the response object with its usage.
- Anthropic: `message_start` carries input and cache counts; each `message_delta` carries a
  *cumulative* `output_tokens` (take the last, never add them up), and may repeat input counts.
- Gemini (`alt=sse`): every chunk carries `usageMetadata`; the last one holds the totals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_cost_exporter.events import TokenCounts
from llm_cost_exporter.usage import UsageError, parse_usage


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str


def iter_sse(text: str) -> Iterator[SSEEvent]:
    """Split an SSE transcript into events (blank-line separated, `data:` lines joined)."""
    event: str | None = None
    data: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if raw == "":
            if data:
                yield SSEEvent(event, "\n".join(data))
            event, data = None, []
            continue
        if raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield SSEEvent(event, "\n".join(data))


@dataclass
class StreamUsage:
    """Accumulates usage over a stream's events, whatever the provider."""

    provider: str | None = None
    model: str | None = None
    _final: Mapping[str, Any] | None = None
    _anthropic: dict[str, Any] = field(default_factory=dict)
    _gemini: Mapping[str, Any] | None = None
    _anthropic_final: bool = False

    def _model(self, value: Any) -> None:
        # Only a string names a model; anything else in that field is ignored, not trusted.
        if isinstance(value, str) and value:
            self.model = value

    def feed(self, data: Any) -> None:
        if not isinstance(data, Mapping):
            return
        kind = data.get("type")
        if kind == "message_start" and isinstance(data.get("message"), Mapping):
            message = data["message"]
            self._model(message.get("model"))
            self._anthropic.update(message.get("usage") or {})
        elif kind == "message_delta":
            # Cumulative counts: the latest value replaces the earlier one.
            self._anthropic.update({k: v for k, v in (data.get("usage") or {}).items()
                                    if v is not None})
            self._anthropic_final = True
        elif kind == "response.completed" and isinstance(data.get("response"), Mapping):
            response = data["response"]
            self._model(response.get("model"))
            self._final = response.get("usage")
        elif "usageMetadata" in data:
            self._model(data.get("modelVersion"))
            self._gemini = data["usageMetadata"]
        else:
            self._model(data.get("model"))
            if data.get("usage"):
                self._final = data["usage"]

    @property
    def complete(self) -> bool:
        """True once the stream has reported its final usage (not only a provisional one)."""
        return bool(self._final or self._gemini or self._anthropic_final)

    @property
    def partial_input(self) -> dict[str, Any]:
        """Input-side counts known before the end (Anthropic's message_start)."""
        return dict(self._anthropic)

    def tokens(self, path: str = "response") -> TokenCounts:
        if self._anthropic:
            return parse_usage(self._anthropic, "anthropic", path)
        if self._gemini is not None:
            return parse_usage(self._gemini, self.provider, path)
        if self._final:
            return parse_usage(self._final, self.provider, path)
        raise UsageError(path, "stream carries no usage (for OpenAI chat streams set "
                               "stream_options.include_usage)")


def parse_transcript(
    text: str, provider: str | None = None, path: str = "response"
) -> tuple[str | None, TokenCounts]:
    acc = StreamUsage(provider=provider)
    for event in iter_sse(text):
        if event.data == "[DONE]":
            break
        try:
            acc.feed(json.loads(event.data))
        except json.JSONDecodeError as exc:
            raise UsageError(path, f"SSE data is not JSON: {exc.msg}") from None
        except RecursionError:
            raise UsageError(path, "SSE data is nested too deeply") from None
    return acc.model, acc.tokens(path)
