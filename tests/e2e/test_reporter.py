"""The in-app reporter: batching, retry until the exporter is up, never failing the app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
