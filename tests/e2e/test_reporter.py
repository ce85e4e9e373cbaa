"""The in-app reporter: batching, retry until the exporter is up, never failing the app."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from llm_cost_exporter.reporter import UsageReporter

from conftest import ExporterProcess, free_port, metric_value
from fixtures.fake_provider import FakeProvider


def test_reports_sdk_responses_after_the_exporter_comes_up(
        exporter_factory: Callable[..., ExporterProcess], fake: FakeProvider,
        tmp_path: Path) -> None:
    port = free_port()
    # The exporter is not running yet: reporting must neither block nor raise.
    reporter = UsageReporter(f"http://127.0.0.1:{port}", department="engineering",
                             project="search", batch_size=50, flush_interval=0.05,
                             max_backoff=0.2)
    client = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="sk-direct", max_retries=0)
    for _ in range(3):
        response = client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "hi"}])
        reporter.report_response("openai", response, latency_seconds=0.4)
    for i in range(117):
        reporter.report("openai", model="gpt-4o-mini", tokens={"input": 1000, "output": 10},
                        project=f"batch-{i % 3}")
    assert not reporter.flush(timeout=0.3)  # nothing can be delivered yet
    exporter = exporter_factory({}, port=port)
    assert reporter.flush(timeout=20)
    reporter.close()
    assert (reporter.sent, reporter.dropped, reporter.rejected) == (120, 0, 0)
    text = exporter.metrics()
    # 3 × gpt-4o: 3 × (464×2.5 + 1536×1.25 + 500×10)/1e6 = 3 × 0.00808 = 0.02424
    assert metric_value(text, "llm_cost_usd_total", department="engineering",
                        project="search", model="gpt-4o") == pytest.approx(0.02424, rel=1e-12)
    assert sum(metric_value(text, "llm_requests_total", project=f"batch-{i}",
                            model="gpt-4o-mini") or 0 for i in range(3)) == 117


def test_a_bad_event_does_not_sink_its_batch(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory({})
    reporter = UsageReporter(exporter.url, department="d", project="p", flush_interval=0.05)
    reporter.report("openai", model="gpt-4o", tokens={"input": 10})
    reporter.report("openai", model="gpt-4o", tokens={"input": -1})  # refused by the API
    reporter.report("openai", model="gpt-4o", tokens={"input": 30})
    assert reporter.flush(timeout=20)
    reporter.close()
    assert (reporter.sent, reporter.rejected) == (2, 1)
    assert metric_value(exporter.metrics(), "llm_tokens_total", department="d", project="p",
                        token_type="input") == 40


@contextmanager
def answer_losing_relay(target: str, lose: int) -> Iterator[tuple[str, list[str | None]]]:
    """A relay in front of the exporter that forwards every request but, for the first
    `lose` of them, drops the connection instead of answering: the batch is committed and
    the client never learns it. Yields its URL and the Idempotency-Key of every request."""
    keys: list[str | None] = []

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            keys.append(self.headers.get("Idempotency-Key"))
            forwarded = httpx.post(target + self.path, content=body, headers={
                k: v for k, v in self.headers.items() if k.lower() != "host"})
            if len(keys) <= lose:
                self.close_connection = True
                self.connection.close()  # the answer is lost on the way back
                return
            self.send_response(forwarded.status_code)
            for name in ("Content-Type", "Idempotent-Replayed"):
                if name in forwarded.headers:
                    self.send_header(name, forwarded.headers[name])
            self.send_header("Content-Length", str(len(forwarded.content)))
            self.end_headers()
            self.wfile.write(forwarded.content)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", keys
    finally:
        server.shutdown()
        server.server_close()


def test_a_batch_whose_answer_was_lost_is_counted_once(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory({})
    with answer_losing_relay(exporter.url, lose=2) as (url, keys):
        reporter = UsageReporter(url, department="d", project="p", batch_size=25,
                                 flush_interval=0.05, max_backoff=0.05)
        for _ in range(25):
            reporter.report("openai", model="gpt-4o", tokens={"input": 100, "output": 10})
        assert reporter.flush(timeout=20)
        reporter.close()
    # One batch, sent three times under one key: committed by the first attempt, replayed
    # by the other two.
    assert len(keys) == 3 and keys[0] is not None and len(set(keys)) == 1
    assert (reporter.sent, reporter.dropped, reporter.rejected) == (25, 0, 0)
    text = exporter.metrics()
    assert metric_value(text, "llm_requests_total", department="d", project="p") == 25
    # 25 x (100 x $2.50 + 10 x $10.00) / 1e6 = 25 x $0.00035 = $0.00875
    assert metric_value(text, "llm_cost_usd_total", department="d",
                        project="p") == pytest.approx(0.00875, rel=1e-12)


def test_full_queue_drops_instead_of_blocking() -> None:
    # batch_size=1: the sender holds at most one event while it retries the dead exporter.
    reporter = UsageReporter(f"http://127.0.0.1:{free_port()}", max_queue=5, batch_size=1,
                             flush_interval=0.01)
    for _ in range(20):
        reporter.report("openai", model="m", tokens={"input": 1})
    # At most 5 queued plus the one the sender holds; the rest are dropped and counted.
    assert 14 <= reporter.dropped <= 15
    reporter._closed.set()


def test_close_counts_what_could_not_be_delivered() -> None:
    reporter = UsageReporter(f"http://127.0.0.1:{free_port()}", flush_interval=0.01,
                             max_backoff=0.05)
    for _ in range(3):
        reporter.report("openai", model="gpt-4o", tokens={"input": 1})
    reporter.close(timeout=0.5)  # the exporter never came up
    assert (reporter.sent, reporter.dropped) == (0, 3)
