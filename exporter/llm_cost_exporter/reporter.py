"""In-app reporter: send usage of calls made directly to providers to the ingest API.

    from llm_cost_exporter.reporter import UsageReporter
    reporter = UsageReporter("http://127.0.0.1:9464", department="eng", project="search")
    response = client.chat.completions.create(model="gpt-4o", messages=[...])
    reporter.report_response("openai", response)

`report*()` never blocks and never raises: events go to a bounded in-memory queue that a
background thread sends in batches, retrying with backoff. Each batch is sent with its own
`Idempotency-Key` and the same bytes on every retry, so a batch retried after a lost answer
is counted once (the exporter replays its first answer). That costs the ledger one index
entry per batch; a random request_id per event would cost one per event.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)


class UsageReporter:
    def __init__(self, url: str = "http://127.0.0.1:9464", *, token: str | None = None,
                 department: str | None = None, project: str | None = None,
                 batch_size: int = 100, flush_interval: float = 1.0,
                 max_queue: int = 10_000, timeout: float = 5.0,
                 max_backoff: float = 30.0) -> None:
        self._endpoint = url.rstrip("/") + "/v1/usage"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._defaults = {k: v for k, v in (("department", department),
                                            ("project", project)) if v}
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(max_queue)
        self._idle = threading.Condition()
        self._in_flight = 0
        self._closed = threading.Event()
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        self._thread = threading.Thread(target=self._run, name="llm-usage-reporter",
                                        daemon=True)
        self._thread.start()

    # -- the app's side: cheap, never raises ------------------------------------------------
    def report(self, provider: str, *, model: str | None = None, usage: Any = None,
               response: Any = None, tokens: dict[str, int] | None = None,
               **fields: Any) -> None:
        """Queue one event (fields as in POST /v1/usage: department, project, user,
        latency_seconds, status, request_id, timestamp)."""
        try:
            event: dict[str, Any] = {**self._defaults, "provider": provider, **fields}
            event.setdefault("timestamp", datetime.now(UTC).isoformat())
            if model is not None:
                event["model"] = model
            for key, value in (("usage", usage), ("response", response), ("tokens", tokens)):
                if value is not None:
                    event[key] = _plain(value)
            with self._idle:
                self._queue.put_nowait(event)
                self._in_flight += 1
        except queue.Full:
            self.dropped += 1  # the app's call matters more than our bookkeeping
        except Exception:  # never let reporting break the caller
            self.dropped += 1
            log.exception("usage event could not be queued")

    def report_response(self, provider: str, response: Any, **fields: Any) -> None:
        """Report an SDK response object (OpenAI, Anthropic, ...) or a response dict."""
        self.report(provider, response=response, **fields)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is delivered (or dropped)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued within `timeout`; what is left then is counted as dropped."""
        self.flush(timeout)
        self._closed.set()
        self._thread.join(timeout)
        left = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        self.dropped += left

    # -- the background thread --------------------------------------------------------------
    def _run(self) -> None:
        import httpx  # imported here: the app pays for it only if it reports

        with httpx.Client(timeout=self._timeout, headers=self._headers) as client:
            while not self._closed.is_set():
                batch = self._take()
                if batch:
                    self._deliver(client, batch)
                    self._done(len(batch))

    def _take(self) -> list[dict[str, Any]]:
        try:
            batch = [self._queue.get(timeout=self._flush_interval)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self._flush_interval
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _deliver(self, client: Any, batch: list[dict[str, Any]]) -> None:
        backoff = 0.1
        # One key and one serialization for every attempt: the key is bound to the bytes.
        try:
            body = json.dumps(batch, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:  # a value JSON cannot carry: no retry helps
            if len(batch) > 1:
                for event in batch:
                    self._deliver(client, [event])
                return
            self.rejected += 1
            log.error("usage reporter: event not sendable as JSON (%s)", type(exc).__name__)
            return
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        while not self._closed.is_set():
            try:
                response = client.post(self._endpoint, content=body, headers=headers)
            except Exception as exc:  # unreachable, timeout: keep the batch, try again
                log.warning("usage reporter: exporter unreachable (%s)", type(exc).__name__)
            else:
                if response.status_code == 202:
                    self.sent += len(batch)
                    return
                if response.status_code == 422 and len(batch) > 1:
                    # One bad event rejects its batch: send one by one to keep the good ones.
                    for event in batch:
                        self._deliver(client, [event])
                    return
                if response.status_code in (400, 401, 413, 422):
                    self.rejected += len(batch)
                    log.error("usage reporter: events rejected (%s): %s",
                              response.status_code, response.text[:500])
                    return
            self._closed.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)
        self.dropped += len(batch)  # closed before the exporter took it

    def _done(self, n: int) -> None:
        with self._idle:
            self._in_flight -= n
            self._idle.notify_all()


def _plain(value: Any) -> Any:
    """SDK response objects (pydantic models) -> plain JSON data."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_unset=True)
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value
