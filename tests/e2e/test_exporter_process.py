"""The real exporter process: restart safety, kill -9, and promtool on its real output."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx

from conftest import ExporterProcess, metric_value, payload
from helpers.binaries import find_binary

CONFIG = """
defaults: {department: unattributed, project: unattributed}
budgets:
  - {department: engineering, project: ai-features, daily_usd: 300, monthly_usd: 5000}
  - {department: data-science, project: "*", daily_usd: 100, monthly_usd: 2000,
     timezone: Asia/Ho_Chi_Minh}
"""


def payload_events() -> list[dict[str, Any]]:
    """Every example payload as an ingest event, with its provider."""
    items = [("openai_chat_cached_reasoning.json", "openai", "engineering", "ai-features"),
             ("openai_chat_stream.sse", "openai", "engineering", "ai-features"),
             ("openai_responses.json", "openai", "engineering", "search"),
             ("openai_embeddings.json", "openai", "data-science", "rag"),
             ("anthropic_messages_cache.json", "anthropic", "engineering", "ai-features"),
             ("anthropic_messages_cache_1h.json", "anthropic", "data-science", "rag"),
             ("anthropic_stream.sse", "anthropic", "data-science", "notebooks"),
             ("gemini_thoughts_cached.json", "gemini", "data-science", "notebooks"),
             ("deepseek_cache.json", "deepseek", "engineering", "search"),
             ("vllm_no_details.json", "vllm", "engineering", "search")]
    return [{"request_id": f"payload-{i}", "provider": provider, "department": dept,
             "project": project, "response": payload(name), "latency_seconds": 0.5 + i,
             "status": 200}
            for i, (name, provider, dept, project) in enumerate(items)]


# Hand-computed in tests/unit/test_pricing.py; summed per budget scope here.
# engineering/ai-features: o3 0.005696 + gpt-4o-mini 0.001512 + sonnet 0.02547 = 0.032678
AI_FEATURES = 0.005696 + 0.001512 + 0.02547
# data-science (all projects): embeddings 0.00016 + haiku-1h 0.01285 + haiku stream 0.0095
# + gemini 0.0195 = 0.04201
DATA_SCIENCE = 0.00016 + 0.01285 + 0.0095 + 0.0195


USAGE_FAMILIES = ("llm_requests_total", "llm_tokens_total", "llm_cost_usd_total",
                  "llm_budget_spend_usd", "llm_request_duration_seconds",
                  "llm_reasoning_tokens_total", "llm_unpriced_requests_total")


def _usage_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(USAGE_FAMILIES))


def _budget_spend(text: str, department: str, project: str) -> float | None:
    return metric_value(text, "llm_budget_spend_usd", department=department, project=project,
                        period="monthly")


def test_restart_keeps_counters_and_month_to_date_spend(
        exporter_factory: Callable[..., ExporterProcess]) -> None:
    exporter = exporter_factory(CONFIG)
    r = exporter.post_usage(payload_events())
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 10, "duplicates": 0}
    before = exporter.metrics()
    assert _budget_spend(before, "engineering", "ai-features") == AI_FEATURES
    assert abs(_budget_spend(before, "data-science", "*") - DATA_SCIENCE) < 1e-12
    # The self-hosted model has no price in this config: visible as unpriced.
    assert metric_value(before, "llm_unpriced_requests_total", provider="vllm",
                        model="llama-3.1-70b-internal") == 1

    exporter.kill9()
    exporter.start()
    after = exporter.metrics()
    assert _usage_lines(after) == _usage_lines(before)
    assert len(_usage_lines(after)) > 60
    # A retry of the whole batch after the restart is still recognised.
    assert exporter.post_usage(payload_events()).json() == {"accepted": 0, "duplicates": 10}


def test_promtool_accepts_real_output(exporter_factory: Callable[..., ExporterProcess]) -> None:
    promtool = find_binary("promtool")
    exporter = exporter_factory(CONFIG)
    hostile = {"provider": "openai", "model": 'we"ird}\\model', "department": "eng\\dept",
               "project": 'quote"d', "tokens": {"input": 3}}
    assert exporter.post_usage([*payload_events(), hostile]).status_code == 202
    text = httpx.get(f"{exporter.url}/metrics", headers={"Accept": "text/plain"}).text
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    # Not a single lint warning on the format Prometheus scrapes.
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result
    assert metric_value(text, "llm_requests_total", model='we"ird}\\model',
                        project='quote"d') == 1


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_both_writer_modes_record_the_same(
        exporter_factory: Callable[..., ExporterProcess], tmp_path: Any) -> None:
    """Default: one ledger writer process beside the server, gone after SIGTERM with every
    acknowledged event committed. writer_process: false: one process. Same numbers."""
    events = payload_events()
    texts = []
    for mode in (True, False):
        exporter = exporter_factory({
            "ledger": {"path": str(tmp_path / f"mode-{mode}.db"), "writer_process": mode},
            "defaults": {"department": "unattributed", "project": "unattributed"}})
        assert exporter.proc is not None
        children = _children(exporter.proc.pid)
        if mode:
            assert len(children) == 1
            with open(f"/proc/{children[0]}/cmdline", "rb") as f:
                assert b"llm_cost_exporter.ledger.sqlite_writer" in f.read()
        else:
            assert children == []
        response = exporter.post_usage(events)
        assert response.status_code == 202 and response.json() == {"accepted": 10,
                                                                    "duplicates": 0}
        texts.append(_usage_lines(exporter.metrics()))
        exporter.stop()
        assert exporter.log_path is not None
        assert "Application shutdown complete." in exporter.log_path.read_text()
        for child in children:
            # The writer leaves once the server's end of the pipe closes: it has committed
            # everything (the server's graceful stop did), checkpoints and exits.
            deadline = time.monotonic() + 15
            while os.path.exists(f"/proc/{child}") and not _zombie(child):
                assert time.monotonic() < deadline, "the writer outlived the server"
                time.sleep(0.02)
    assert texts[0] == texts[1]
    for mode in (True, False):
        with sqlite3.connect(tmp_path / f"mode-{mode}.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (10,)
    # engineering/ai-features: 0.032678 USD (hand-computed above), the same in both modes
    cost = sum(float(line.rsplit(" ", 1)[1]) for line in texts[0]
               if line.startswith("llm_cost_usd_total") and 'project="ai-features"' in line)
    assert abs(cost - AI_FEATURES) < 1e-9


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
