"""Which headers cross the proxy, in each direction, and how bodies are decoded to read usage."""

from __future__ import annotations

import zlib
from typing import Any

from llm_cost_exporter.auth import bearer_ok
from llm_cost_exporter.config_proxy import Upstream
from llm_cost_exporter.proxy import wire

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones the transport recomputes.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
              b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"}
ATTRIBUTION = {b"x-llm-department": "department", b"x-llm-project": "project",
               b"x-llm-user": "user"}
# Encodings we can decode to read usage; the bytes themselves pass through unchanged.
DECODABLE = {"gzip", "deflate", "identity"}


def forward_headers(raw: list[tuple[bytes, bytes]], upstream: Upstream
                    ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Request headers to send upstream, and the attribution headers taken out of them."""
    out: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    dropped = set(HOP_BY_HOP)
    for name, value in raw:
        if name == b"connection":  # headers the client marked hop-by-hop
            dropped |= {v.strip().lower() for v in value.split(b",")}
    for name, value in raw:
        if name in dropped:
            continue
        if name in ATTRIBUTION:
            found[ATTRIBUTION[name]] = value.decode("latin-1")
            continue
        if upstream.api_key and name in wire.KEY_HEADERS:
            continue
        if name == b"accept-encoding":
            # Only encodings we can decode to read usage; the body itself passes as is.
            kept = [e for e in value.decode("latin-1").split(",")
                    if e.split(";")[0].strip().lower() in DECODABLE]
            if kept:
                out.append(("accept-encoding", ",".join(kept).strip()))
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if upstream.api_key:
        key_name, key_value = wire.key_header(upstream.wire_format, upstream.api_key)
        out.append((key_name.decode(), key_value.decode()))
    return out, found


def proxy_auth_ok(headers: list[tuple[bytes, bytes]], tokens: tuple[str, ...]) -> bool:
    for name, value in headers:
        if name == b"proxy-authorization":
            return bearer_ok(value.decode("latin-1"), tokens)
    return False


def decoder_for(encoding: str) -> Any:
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "deflate"):
        return zlib.decompressobj(47)  # 32 + 15: accept gzip and zlib headers alike
    return None


def response_headers(raw: Any, keep_length: bool) -> list[tuple[bytes, bytes]]:
    drop = HOP_BY_HOP if not keep_length else HOP_BY_HOP - {b"content-length"}
    return [(name.lower(), value) for name, value in raw if name.lower() not in drop]
