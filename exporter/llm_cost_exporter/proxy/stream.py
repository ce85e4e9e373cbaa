"""A tap on an SSE stream on its way to the client: usage, text for estimates, filtering."""

from __future__ import annotations

import json
from typing import Any

from llm_cost_exporter.events import TokenCounts
from llm_cost_exporter.proxy.wire import (
    delta_text_chars,
    estimate_tokens,
    is_usage_only_chunk,
    request_text_chars,
    strip_usage_null,
)
from llm_cost_exporter.streams import StreamUsage
from llm_cost_exporter.usage import UsageError, parse_usage

# Only events that can carry usage are JSON-decoded while streaming; the rest are kept raw
# and decoded only if the stream ends without usage (to estimate from their text).
_USAGE_MARKERS = (b'"usage":{', b'"usage": {', b"usageMetadata", b"message_start",
                  b"message_delta", b"response.completed")
_MAX_KEPT_BYTES = 16 * 1024 * 1024


class StreamTap:
    def __init__(self, provider: str, strip_usage: bool) -> None:
        self._usage = StreamUsage(provider=provider)
        self._strip = strip_usage
        self._buffer = b""
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes from upstream; return the bytes to send to the client now."""
        self._buffer += chunk
        out: list[bytes] = []
        while True:
            end, sep = _event_end(self._buffer)
            if end < 0:
                break
            event, self._buffer = self._buffer[:end + sep], self._buffer[end + sep:]
            forwarded = self._event(event)
            if forwarded:
                out.append(forwarded)
        if not self._strip:
            # Nothing is altered: forward exactly what arrived, even a partial event.
            return chunk
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            forwarded = self._event(rest)
            return forwarded if self._strip else b""
        return rest if self._strip else b""

    def _event(self, event: bytes) -> bytes:
        data = _data_of(event)
        if data is None or data == b"[DONE]":
            return event
        self.events += 1
        if any(marker in data for marker in _USAGE_MARKERS):
            try:
                parsed = json.loads(data)
            except ValueError:
                return event
            if self._strip and isinstance(parsed, dict) and is_usage_only_chunk(parsed):
                self._usage.feed(parsed)
                return b""  # the chunk the client did not ask for
            self._usage.feed(parsed)
            if isinstance(parsed, dict) and parsed.get("type") == "content_block_delta":
                self._keep(data)
        elif self._kept_bytes < _MAX_KEPT_BYTES:
            self._keep(data)
        return strip_usage_null(event) if self._strip else event

    def _keep(self, data: bytes) -> None:
        self._kept.append(data)
        self._kept_bytes += len(data)

    @property
    def model(self) -> str | None:
        return self._usage.model

    def result(self, request: dict[str, Any] | None) -> tuple[TokenCounts, bool]:
        """(tokens, estimated). Exact when the stream reported usage; otherwise estimated."""
        if self._usage.complete:
            try:
                return self._usage.tokens(), False
            except UsageError:
                pass
        text = 0
        for data in self._kept:
            try:
                parsed = json.loads(data)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                text += delta_text_chars(parsed)
        partial = self._usage.partial_input
        if partial:  # Anthropic told us the input side in message_start
            try:
                known = parse_usage({**partial, "output_tokens": 0}, "anthropic")
            except UsageError:
                known = TokenCounts()
            return TokenCounts(input=known.input, cache_read=known.cache_read,
                               cache_write=known.cache_write,
                               cache_write_1h=known.cache_write_1h,
                               output=estimate_tokens(text)), True
        return TokenCounts(input=estimate_tokens(request_text_chars(request)),
                           output=estimate_tokens(text)), True


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Index and length of the first event separator (blank line), or (-1, 0)."""
    lf = buffer.find(b"\n\n")
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf >= 0 else (-1, 0)


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n")
             if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
