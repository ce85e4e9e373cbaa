"""The HTTP application: ingest API, /metrics, health. Built by a factory, never at import."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import exposition as prom_exposition
from prometheus_client.openmetrics import exposition as om_exposition
from starlette.requests import ClientDisconnect

from llm_cost_exporter import __version__
from llm_cost_exporter.auth import bearer_ok, metrics_auth_ok
from llm_cost_exporter.clock import Clock
from llm_cost_exporter.config import Config
from llm_cost_exporter.events import Attribution
from llm_cost_exporter.ingest import IngestError, decode_body, idempotency_key, parse_events
from llm_cost_exporter.ledger import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    Ledger,
    LedgerOutcomeUnknown,
    LedgerRejected,
    LedgerUnavailable,
)
from llm_cost_exporter.price_db import GenAIPricesDB
from llm_cost_exporter.proxy.asgi import Receive, Scope, Send
from llm_cost_exporter.state import ExporterState

log = logging.getLogger(__name__)
# The classic text format every Prometheus since 2.0 reads; our names need no UTF-8 escaping.
TEXT_FORMAT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
# FastAPI 0.16x asks the OpenTelemetry providers on every request whether to trace it
# (about 3% of a batch's CPU in the server). The exporter's telemetry is its own /metrics:
# the hooks are off where this FastAPI has them.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


class BodyTooLarge(Exception):
    pass


class ExporterApp:
    """The ASGI application: proxied paths go straight to the proxy, `POST /v1/usage`
    straight to its handler, the rest to FastAPI.

    The proxy and ingest sit outside FastAPI's routing and middleware stack on purpose:
    every layer there is paid on every LLM call of every app behind the sidecar, and on
    every ingest request (about 10% of the server's CPU in a batch run, py-spy). Ingest
    runs the same handler FastAPI has registered (which also gives the OpenAPI schema), on
    a plain Starlette Request; `v1` can never be an upstream's name.
    """

    def __init__(self, api: FastAPI, state: ExporterState,
                 ingest: Callable[[Request], Awaitable[Response]]) -> None:
        self.api = api
        self.state = state
        self._ingest = ingest
        self._dispatch = state.proxy.middleware(api)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/usage" \
                and scope["method"] == "POST":
            response = await self._ingest(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self._dispatch(scope, receive, send)


def create_app(config: Config, ledger: Ledger, clock: Clock, *,
               price_db: GenAIPricesDB | None = None) -> ExporterApp:
    state = ExporterState(config, ledger, clock, price_db)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        await state.proxy.start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # SIGHUP reloads the config, as Prometheus does (main thread only).
            loop.add_signal_handler(signal.SIGHUP, state.reload)
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        await state.proxy.close()
        # Graceful stop: commit what is queued before the process exits.
        state.commits.close()

    app = FastAPI(title="llm-cost-exporter", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, **_NO_TELEMETRY)

    @app.post("/v1/usage", status_code=202)
    async def ingest(request: Request) -> Response:
        if not bearer_ok(request.headers.get("authorization"), state.config.ingest.tokens):
            state.stats.reject("unauthorized")
            return _error(401, "unauthorized", "missing or wrong bearer token",
                          headers={"WWW-Authenticate": "Bearer"})
        try:
            raw = await _read_body(request, state.config.ingest.max_body_bytes)
        except ClientDisconnect:
            # The client gave up mid-body: nothing to record and nobody to answer.
            return Response(status_code=499)
        except BodyTooLarge:
            state.stats.reject("too_large")
            return _error(413, "too_large",
                          f"body larger than {state.config.ingest.max_body_bytes} bytes")
        errors: list[tuple[str, str]] = []
        batch_key = None
        try:
            key = idempotency_key(request.headers.getlist("idempotency-key"))
        except IngestError as exc:
            errors += exc.errors
        else:
            if key is not None:
                # SHA-256: the CPU's own instructions hash a 31 KB batch in half the time
                # BLAKE2b takes here (17.8 against 32.6 us).
                batch_key = BatchKey(_scoped(key, request.headers.get("authorization"),
                                             state.config.ingest.tokens),
                                     hashlib.sha256(raw).digest())
        if batch_key is not None:
            # A retry of a recorded batch gets its first answer before anything else runs:
            # not re-validated (the rules may have been reloaded since), priced or labelled.
            try:
                earlier = await _lookup_key(state.ledger, batch_key)
                if isinstance(earlier, IdempotencyConflict):
                    earlier = await _legacy_key(state.ledger, batch_key, raw) or earlier
            except LedgerUnavailable as exc:
                return _unavailable(state, exc)
            if earlier is not None:
                return _key_answer(state, earlier)
        try:
            body = decode_body(raw)
        except (ValueError, RecursionError) as exc:
            state.stats.reject("invalid")
            message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            return _error(400, "invalid_json", f"body: not valid JSON ({message})"[:300])
        defaults = Attribution(state.config.default_department, state.config.default_project)
        try:
            events = parse_events(body, defaults=defaults, now=state.clock.now(),
                                  limits=state.limits)
        except IngestError as exc:
            errors += exc.errors
        if errors:
            state.stats.reject("invalid")
            return JSONResponse(status_code=422, content={
                "error": "invalid_usage",
                "message": "nothing from this request was recorded; fix these fields",
                "errors": [{"field": f, "message": m} for f, m in errors[:100]],
            })
        try:
            result = await state.recorder.record(events, batch_key)
        except IdempotencyConflict as exc:
            # The key was stored after the check above (a concurrent retry), perhaps by an
            # older replica, with the old digest: that too is a replay.
            legacy = None
            if batch_key is not None:  # always: only a keyed batch can conflict
                try:
                    legacy = await _legacy_key(state.ledger, batch_key, raw)
                except LedgerUnavailable as unavailable:
                    return _unavailable(state, unavailable)
            return _key_answer(state, legacy or exc)
        except LedgerRejected as exc:
            state.stats.reject("invalid")
            where = "events" if isinstance(body, list) else "body"
            if exc.position is not None and isinstance(body, list):
                where = f"events[{exc.position}]"
            return JSONResponse(status_code=422, content={
                "error": "invalid_usage",
                "message": "nothing from this request was recorded; fix these fields",
                "errors": [{"field": where, "message": str(exc)}],
            })
        except LedgerUnavailable as exc:
            return _unavailable(state, exc)
        state.stats.ledger_up = True
        return _key_answer(state, result)

    @app.post("/-/reload")
    def reload(request: Request) -> Response:
        if not bearer_ok(request.headers.get("authorization"), state.config.ingest.tokens):
            return _error(401, "unauthorized", "missing or wrong bearer token",
                          headers={"WWW-Authenticate": "Bearer"})
        ok, notes = state.reload()
        if not ok:
            return JSONResponse(status_code=400, content={
                "error": "invalid_config", "message": "new config refused; the running "
                "config is kept", "errors": notes})
        return JSONResponse({"status": "reloaded", "notes": notes})

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        if not metrics_auth_ok(request.headers.get("authorization"), state.config.metrics):
            return _error(401, "unauthorized", "/metrics needs credentials",
                          headers={"WWW-Authenticate": 'Basic realm="metrics", Bearer'})
        openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
        totals = state.ledger.totals()

        def body() -> Iterator[bytes]:
            # Streamed in pieces: a 50,000-series scrape never sits whole in memory.
            for chunk in state.renderer.chunks(totals, openmetrics):
                yield chunk.encode()
            if openmetrics:  # its generate_latest ends the exposition with "# EOF"
                yield om_exposition.generate_latest(state.registry)
            else:
                yield prom_exposition.generate_latest(state.registry)

        media = om_exposition.CONTENT_TYPE_LATEST if openmetrics else TEXT_FORMAT_0_0_4
        return StreamingResponse(body(), media_type=media)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            state.ledger.check()
        except LedgerUnavailable as exc:
            state.stats.ledger_up = False
            return _error(503, "not_ready", str(exc))
        state.stats.ledger_up = True
        return JSONResponse({"status": "ready"})

    @app.get("/")
    def index() -> PlainTextResponse:
        return PlainTextResponse(
            f"llm-cost-exporter {__version__}\n"
            "POST /v1/usage  ingest usage events\nGET /metrics  Prometheus metrics\n"
            "GET /healthz  liveness\nGET /readyz  readiness (ledger writable)\n"
            "POST /-/reload  re-read the config file (also on SIGHUP)\n"
            "/{upstream}/...  proxy to a configured LLM API\n")

    # The proxy dispatch is always in front (cheap without upstreams), so that a reload can
    # add upstreams.
    return ExporterApp(app, state, ingest)


def _scoped(key: str, authorization: str | None, tokens: tuple[str, ...]) -> str:
    """Keys are per client, as the IETF draft has them: with ingest tokens configured, the
    stored key starts with a hash of the caller's token (never the token itself), so two
    teams that pick the same key do not replay each other's batches."""
    if not tokens or not authorization:
        # Its own namespace: a key sent without a token can never name a token's key.
        return f"-:{key}"
    token = authorization[7:].strip().encode()  # auth already checked it is "Bearer <t>"
    scope = hashlib.blake2b(token, digest_size=8, person=b"idem-key-scope").hexdigest()
    return f"{scope}:{key}"


async def _lookup_key(ledger: Ledger, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
    # A local SQLite read takes microseconds; a database across the network runs in a thread
    # so the event loop never waits on it.
    if getattr(ledger, "cheap_reads", False):
        return ledger.lookup_key(key)
    return await asyncio.to_thread(ledger.lookup_key, key)


async def _legacy_key(ledger: Ledger, key: BatchKey, raw: bytes) -> BatchResult | None:
    """The first answer to a batch whose key an older exporter stored, with a 16-byte
    BLAKE2b digest of the body: a retry across the upgrade is still a replay."""
    earlier = await _lookup_key(ledger, BatchKey(key.key,
                                                 hashlib.blake2b(raw, digest_size=16).digest()))
    return earlier if isinstance(earlier, BatchResult) else None


def _key_answer(state: ExporterState, result: BatchResult | IdempotencyConflict) -> Response:
    if isinstance(result, IdempotencyConflict):
        state.stats.reject("invalid")
        return JSONResponse(status_code=422, content={
            "error": "idempotency_key_reused",
            "message": "nothing from this request was recorded",
            "errors": [{"field": "Idempotency-Key", "message": f"{result}: use a new key for "
                        "a new batch, the same key only to retry the same body"}],
        })
    # A replay answers as the first time did (the IETF draft's and Stripe's convention),
    # marked so that a client can tell.
    return JSONResponse(status_code=202, content={"accepted": result.accepted,
                                                  "duplicates": result.duplicates},
                        headers={"Idempotent-Replayed": "true"} if result.replayed else None)


def _unavailable(state: ExporterState, exc: LedgerUnavailable) -> Response:
    state.stats.reject("unavailable")
    state.stats.ledger_error()
    log.error("ledger write failed", extra={"error": str(exc)})
    if isinstance(exc, LedgerOutcomeUnknown):
        return _error(503, "ledger_outcome_unknown",
                      "the ledger writer stopped before confirming this batch: it may have "
                      "been recorded; retry with the same request_id or Idempotency-Key "
                      "(counted once)", headers={"Retry-After": "5"})
    return _error(503, "ledger_unavailable",
                  "the ledger cannot be written; nothing was recorded, retry later",
                  headers={"Retry-After": "5"})


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "message": message},
                        headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a lying or missing Content-Length cannot get past the limit
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
