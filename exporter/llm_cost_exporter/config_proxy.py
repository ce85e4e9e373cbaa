"""Config sections of the proxy: upstreams (where calls go) and proxy settings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_cost_exporter.credentials import read_secret, read_tokens
from llm_cost_exporter.validation import Problems

WIRE_FORMATS = ("openai", "anthropic", "gemini")
_UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Paths the exporter serves itself: an upstream may not shadow them.
_RESERVED = {"v1", "metrics", "healthz", "readyz", "docs", "openapi.json", "-"}


@dataclass(frozen=True)
class Upstream:
    """An LLM API the proxy forwards `/{name}/...` to; the address only ever comes from here."""

    name: str
    base_url: str
    wire_format: str  # openai (and every OpenAI-compatible server) | anthropic | gemini
    provider: str  # provider name used for pricing and labels
    api_key: str | None = field(default=None, repr=False)  # replaces the client's key
    timeout_seconds: float = 600.0
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class ProxyConfig:
    # Bearer tokens apps present in `Proxy-Authorization`; empty = no proxy auth.
    tokens: tuple[str, ...] = field(default=(), repr=False)
    max_request_bytes: int = 64 * 1024 * 1024
    # How often the proxy re-reads budget spend from the ledger (it also adds its own
    # commits as they happen); bounds how far replicas can overshoot together.
    budget_refresh_seconds: float = 5.0


def parse_upstreams(value: Any, base_dir: Path, env: Mapping[str, str],
               p: Problems) -> tuple[Upstream, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        p.add("upstreams", "must be a list")
        return ()
    out: list[Upstream] = []
    allowed = {"name", "base_url", "format", "provider", "api_key", "api_key_env",
               "api_key_file", "timeout_seconds", "connect_timeout_seconds"}
    for i, raw in enumerate(value):
        path = f"upstreams[{i}]"
        obj = p.mapping(raw, path)
        p.unknown_keys(obj, allowed, path)
        name = p.string(obj, "name", path, required=True)
        if name is not None and (not _UPSTREAM_NAME.match(name) or name in _RESERVED):
            p.add(f"{path}.name", "must match [a-z0-9][a-z0-9_-]{0,31} and not be a path the "
                                  f"exporter serves ({', '.join(sorted(_RESERVED))})")
            name = None
        if name is not None and any(u.name == name for u in out):
            p.add(f"{path}.name", f"duplicate upstream {name!r}")
        base_url = p.string(obj, "base_url", path, required=True)
        if base_url is not None and not re.match(r"^https?://[^/\s]+", base_url):
            p.add(f"{path}.base_url", "must be an http:// or https:// URL")
            base_url = None
        wire = obj.get("format", "openai")
        if wire not in WIRE_FORMATS:
            p.add(f"{path}.format", f"must be one of {', '.join(WIRE_FORMATS)}")
        provider = p.string(obj, "provider", path) or (name or "")
        key = read_secret(obj, "api_key", path, base_dir, env, p)
        timeout = p.decimal(obj, "timeout_seconds", path, positive=True)
        connect = p.decimal(obj, "connect_timeout_seconds", path, positive=True)
        if name is None or base_url is None or wire not in WIRE_FORMATS:
            continue
        out.append(Upstream(
            name=name, base_url=base_url.rstrip("/"), wire_format=wire,
            provider=provider.lower(), api_key=key,
            timeout_seconds=float(timeout) if timeout is not None else 600.0,
            connect_timeout_seconds=float(connect) if connect is not None else 10.0,
        ))
    return tuple(out)


def parse_proxy(obj: Mapping[str, Any], base_dir: Path, env: Mapping[str, str],
                p: Problems) -> ProxyConfig:
    p.unknown_keys(obj, {"max_request_bytes", "budget_refresh_seconds", "tokens_env",
                         "tokens_file", "tokens"}, "proxy")
    refresh = p.decimal(obj, "budget_refresh_seconds", "proxy", positive=True)
    return ProxyConfig(
        tokens=read_tokens(obj, "proxy", base_dir, env, p),
        max_request_bytes=p.integer(obj, "max_request_bytes", "proxy", 64 * 1024 * 1024,
                                    minimum=1024),
        budget_refresh_seconds=float(refresh) if refresh is not None else 5.0,
    )
