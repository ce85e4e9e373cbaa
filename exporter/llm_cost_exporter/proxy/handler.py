"""The proxy itself: a raw ASGI handler in front of the FastAPI app.

`/{upstream}/...` is forwarded to the configured upstream (never to an address taken from
the request); everything else goes to the exporter's own routes. Raw ASGI rather than a
FastAPI route because every microsecond here is added to every LLM call of every app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp

from llm_cost_exporter.budget_guard import BudgetGuard
from llm_cost_exporter.clock import Clock
from llm_cost_exporter.config import Config
from llm_cost_exporter.config_proxy import Upstream
from llm_cost_exporter.events import Attribution, TokenCounts, UsageEvent
from llm_cost_exporter.labels import label_problem, sanitize
from llm_cost_exporter.ledger import LedgerRejected, LedgerUnavailable
from llm_cost_exporter.proxy import wire
from llm_cost_exporter.proxy.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    read_body,
    reply,
    watch_disconnect,
)
from llm_cost_exporter.proxy.headers import (
    decoder_for,
    forward_headers,
    proxy_auth_ok,
    response_headers,
)
from llm_cost_exporter.proxy.metrics import ProxyStats
from llm_cost_exporter.proxy.stream import StreamTap
from llm_cost_exporter.recorder import Recorder
from llm_cost_exporter.stats import ExporterStats
from llm_cost_exporter.usage import UsageError, parse_response

log = logging.getLogger(__name__)

_GENERATION = ("/chat/completions", "/completions", "/responses", "/messages", "/embeddings",
               ":generateContent", ":streamGenerateContent", ":embedContent")


class _ClientGone(Exception):
    pass


@dataclass
class _Call:
    """What one proxied call has learned so far."""

    upstream: Upstream
    attribution: Attribution
    path: str
    started: float
    request: dict[str, Any] | None
    model: str
    ttft: float | None = None
    tap: StreamTap | None = None
    recorded: bool = False


class Proxy:
    def __init__(self, config: Config, recorder: Recorder, budgets: BudgetGuard, clock: Clock,
                 stats: ExporterStats) -> None:
        self.upstreams = {u.name: u for u in config.upstreams}
        self._config = config
        self._recorder = recorder
        self._budgets = budgets
        self._clock = clock
        self._stats = stats
        self.metrics = ProxyStats()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # One shared pool for all calls; no connection limit of our own: the upstream's
            # rate limits are the app's business, not the sidecar's.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                trust_env=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reconfigure(self, config: Config, budgets: BudgetGuard) -> None:
        self.upstreams = {u.name: u for u in config.upstreams}
        self._config = config
        self._budgets = budgets

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and self.upstreams:
                path: str = scope["path"]
                cut = path.find("/", 1)
                upstream = self.upstreams.get(path[1:cut] if cut > 0 else path[1:])
                if upstream is not None:
                    await self.handle(upstream, scope, receive, send, path[cut:] if cut > 0
                                      else "/")
                    return
            await app(scope, receive, send)

        return dispatch

    # -- one call -------------------------------------------------------------------------
    async def handle(self, upstream: Upstream, scope: Scope, receive: Receive, send: Send,
                     rest: str) -> None:
        started = time.perf_counter()
        fmt = upstream.wire_format
        if self._config.proxy.tokens and not proxy_auth_ok(scope["headers"],
                                                             self._config.proxy.tokens):
            await reply(send, 407, wire.error_body(fmt, 407, "proxy_auth_required",
                         "missing or wrong Proxy-Authorization bearer token"),
                         [(b"proxy-authenticate", b"Bearer")])
            return
        try:
            body = await read_body(receive, self._config.proxy.max_request_bytes)
        except ValueError:
            await reply(send, 413, wire.error_body(fmt, 413, "request_too_large",
                         "request body larger than proxy.max_request_bytes"))
            return
        headers, found = forward_headers(scope["headers"], upstream)
        attribution, problem = self._attribution(found)
        if problem:
            await reply(send, 400, wire.error_body(fmt, 400, "invalid_attribution", problem))
            return
        request = _json_object(body)
        model = request.get("model") if request else None
        if fmt == "gemini":
            model = wire.model_from_path(rest)
        call = _Call(upstream, attribution, rest, started, request,
                     model if isinstance(model, str) and model else "unknown")
        labels = self._recorder.guard.scope_of(attribution)
        block = self._budgets.check(*labels)
        if block is not None:
            self.metrics.blocked[labels] += 1
            message = (f"budget of {block.department}/{block.project} for this {block.period} "
                       f"period is spent (${block.spend:.2f} of ${block.limit:.2f}); "
                       f"retry after {block.period_end.isoformat()}")
            await reply(send, 429, wire.error_body(fmt, 429, "budget_exceeded", message),
                         [(b"retry-after", str(block.retry_after_seconds).encode()),
                          (b"x-should-retry", b"false")])
            return
        strip = request is not None and wire.wants_usage_injection(fmt, rest, request)
        if strip and request is not None:
            body = wire.inject_usage_option(request)
        url = upstream.base_url + rest
        query = scope.get("query_string", b"").decode("latin-1")
        if query and upstream.api_key and fmt == "gemini":
            query = wire.without_key_param(query)
        if query:
            url += "?" + query
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch_disconnect(receive, gone, task))
        try:
            await self._forward(call, scope["method"], url, headers, body, strip, send, gone)
        except asyncio.CancelledError:
            if not gone.is_set() or task is None:
                raise
            task.uncancel()
        finally:
            watcher.cancel()

    async def _forward(self, call: _Call, method: str, url: str,
                       headers: list[tuple[str, str]], body: bytes, strip: bool, send: Send,
                       gone: asyncio.Event) -> None:
        assert self._session is not None
        up = call.upstream
        timeout = aiohttp.ClientTimeout(total=None, connect=up.connect_timeout_seconds,
                                        sock_read=up.timeout_seconds)
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self._session.request(
                method, url, data=body or None, headers=headers, allow_redirects=False,
                timeout=timeout)
            if response.content_type == "text/event-stream" and response.status < 400:
                await self._stream(call, response, strip, send, gone)
            else:
                await self._whole(call, method, response, send)
        except asyncio.CancelledError:
            if gone.is_set():
                await self._client_closed(call)
            raise
        except _ClientGone:
            await self._client_closed(call)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            await self._upstream_failed(call, send, 504, "timeout",
                                        f"upstream {up.name} did not answer in time")
        except aiohttp.ClientError as exc:
            if response is not None:  # broke mid-response: nothing more can be sent
                log.warning("upstream broke mid-response", extra={"upstream": up.name,
                                                                   "error": type(exc).__name__})
                await self._record(call, TokenCounts(), "error", estimated=False)
                return
            await self._upstream_failed(call, send, 502, "unreachable",
                                        f"upstream {up.name} is unreachable")
        finally:
            if response is not None:
                response.release()

    async def _whole(self, call: _Call, method: str, response: aiohttp.ClientResponse,
                     send: Send) -> None:
        data = await response.read()
        status = response.status
        tokens, estimated, model = TokenCounts(), False, None
        recordable = status >= 400 or (method == "POST" and call.path.endswith(_GENERATION))
        if status < 400 and recordable:
            tokens, estimated, model = _usage_of(call, data, response)
        if status >= 400:
            self.metrics.upstream_errors[(call.upstream.provider, f"{status // 100}xx")] += 1
        if model:
            call.model = model
        if recordable:
            await self._record(call, tokens, "error" if status >= 400 else "success",
                               estimated=estimated)
        await send({"type": "http.response.start", "status": status,
                    "headers": response_headers(response.raw_headers, keep_length=True)})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _stream(self, call: _Call, response: aiohttp.ClientResponse, strip: bool,
                      send: Send, gone: asyncio.Event) -> None:
        tap = call.tap = StreamTap(call.upstream.provider, strip)
        decoder = decoder_for(response.headers.get("content-encoding", ""))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": response_headers(response.raw_headers, keep_length=False)})
        async for chunk in response.content.iter_any():
            if call.ttft is None:
                call.ttft = time.perf_counter() - call.started
            plain = decoder.decompress(chunk) if decoder else chunk
            out = tap.feed(plain)
            if decoder is None and out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            elif decoder is not None:  # compressed: pass the original bytes through
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if gone.is_set():
                raise _ClientGone
        tail = tap.flush()
        if tail and decoder is None:
            await send({"type": "http.response.body", "body": tail, "more_body": True})
        call.model = tap.model or call.model
        tokens, estimated = tap.result(call.request)
        # Committed before the stream is closed, so the client's last read waits for it.
        await self._record(call, tokens, "success", estimated=estimated)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _client_closed(self, call: _Call) -> None:
        """The client left: record what was received (estimated where usage was cut off)."""
        if call.recorded:
            return
        if call.tap is not None:
            call.model = call.tap.model or call.model
            tokens, estimated = call.tap.result(call.request)
        else:
            tokens, estimated = TokenCounts(), False
        await self._record(call, tokens, "client_closed", estimated=estimated)

    async def _upstream_failed(self, call: _Call, send: Send, status: int, status_class: str,
                               message: str) -> None:
        self.metrics.upstream_errors[(call.upstream.provider, status_class)] += 1
        await self._record(call, TokenCounts(), "error", estimated=False)
        code = "upstream_timeout" if status == 504 else "upstream_unreachable"
        await reply(send, status, wire.error_body(call.upstream.wire_format, status, code,
                                                   message))

    async def _record(self, call: _Call, tokens: TokenCounts, outcome: str,
                      estimated: bool) -> None:
        call.recorded = True
        seconds = time.perf_counter() - call.started
        # The model comes from the app's request or the provider's answer: it cannot be
        # refused any more, so it is made a safe label instead.
        model = sanitize(call.model, self._config.labels.max_value_length)
        event = UsageEvent(attribution=call.attribution, provider=call.upstream.provider,
                           model=model, tokens=tokens, timestamp=self._clock.now(),
                           outcome=outcome, latency_seconds=seconds, source="proxy",
                           estimated=estimated)
        priced = self._recorder.prepare([event])
        labels = priced[0].labels
        # Observed before the commit: a client that leaves now must not erase the call.
        self.metrics.observe(labels.provider, labels.model, seconds, call.ttft)
        try:
            # Shielded: if the client disconnects now, the commit still completes.
            await asyncio.shield(self._recorder.commit(priced))
        except (LedgerUnavailable, LedgerRejected) as exc:
            # The app's call must not fail because our ledger did: count it loudly instead.
            self._stats.ledger_error()
            log.error("proxy usage not recorded: ledger unavailable",
                      extra={"error": str(exc), "upstream": call.upstream.name})

    # -- request pieces -------------------------------------------------------------------
    def _attribution(self, found: dict[str, str]) -> tuple[Attribution, str | None]:
        cfg = self._config
        values = {"department": cfg.default_department, "project": cfg.default_project,
                  "user": None}
        for key, value in found.items():
            problem = label_problem(value, cfg.labels.max_value_length)
            if problem is not None:
                return Attribution("", ""), f"header X-LLM-{key.title()}: {problem}"
            values[key] = value.strip()
        return Attribution(values["department"] or "", values["project"] or "",
                           values["user"]), None


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body.startswith(b"{") or len(body) > 4 * 1024 * 1024:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _usage_of(call: _Call, data: bytes, response: aiohttp.ClientResponse
              ) -> tuple[TokenCounts, bool, str | None]:
    """(tokens, estimated, model) of a whole JSON answer."""
    decoder = decoder_for(response.headers.get("content-encoding", ""))
    try:
        plain = decoder.decompress(data) + decoder.flush() if decoder else data
        body = json.loads(plain)
    except (ValueError, zlib.error):
        body = None
    if isinstance(body, dict):
        try:
            model, tokens = parse_response(body, call.upstream.provider)
            return tokens, False, model
        except UsageError:
            text = sum(len(s) for s in wire._strings([body.get("choices"), body.get("content"),
                                                      body.get("output")]))
            return (TokenCounts(input=wire.estimate_tokens(wire.request_text_chars(call.request)),
                                output=wire.estimate_tokens(text)), True,
                    body.get("model") if isinstance(body.get("model"), str) else None)
    return TokenCounts(input=wire.estimate_tokens(wire.request_text_chars(call.request))), \
        True, None
