"""Exporter -> Prometheus -> Alertmanager -> fake Slack / PagerDuty, all real processes.

Usage posted to a real exporter moves its budget gauges; a real Prometheus scrapes them every
second and evaluates the bundle's rules (the `for:` holds set to 0s: promtool tests cover
them); a real Alertmanager with the repository's routes, inhibition and templates notifies a
local fake Slack and PagerDuty. gpt-4o input costs $2.50 per 1M tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helpers.monitoring import (
    FakeReceivers,
    Service,
    alertmanager,
    fake_receivers,
    prometheus,
    runtime_alertmanager_config,
    wait_for,
)
from helpers.promql import RULE_FILES

ROOT = Path(__file__).resolve().parents[2]
EXPORTER_CONFIG = """
budgets:
  - {department: engineering, project: ai-features, daily_usd: 10, monthly_usd: 100,
     warning_ratio: 0.8, timezone: UTC}
"""


def gpt4o(input_tokens: int, model: str = "gpt-4o") -> list[dict[str, Any]]:
    return [{"department": "engineering", "project": "ai-features", "provider": "openai",
             "model": model, "tokens": {"input": input_tokens, "output": 0}}]


def post(exporter: Any, events: list[dict[str, Any]]) -> None:
    response = exporter.post_usage(events)
    assert response.is_success, response.text
    assert response.json()["accepted"] == len(events), response.text


def fast_rules(workdir: Path) -> list[str]:
    """The repository's rules with every `for:` hold set to 0s, except LLMExporterDown's:
    its absent() branch is true until the first scrape and would page at start-up."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in RULE_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                if "for" in rule and rule.get("alert") != "LLMExporterDown":
                    rule["for"] = "0s"
        out = workdir / path.name
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(str(out))
    return paths


def prometheus_config(workdir: Path, exporter_port: int, am_url: str) -> dict[str, Any]:
    """prometheus/prometheus.yml with 1s intervals and the test's addresses."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = fast_rules(workdir / "rules")
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [am_url.removeprefix("http://")]}]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    return config


@pytest.fixture
def pipeline(tmp_path: Path, exporter_factory: Callable[[str], Any]
             ) -> Iterator[tuple[Any, Service, FakeReceivers]]:
    exporter = exporter_factory(EXPORTER_CONFIG)
    with fake_receivers() as fake:
        am_config = runtime_alertmanager_config(tmp_path / "secrets", fake.url)
        with alertmanager(tmp_path / "am", am_config) as am, \
                prometheus(tmp_path / "prom",
                           prometheus_config(tmp_path / "prom", exporter.port, am.url)) as prom:
            yield exporter, prom, fake


def slack(fake: FakeReceivers) -> str:
    return "\n".join(a["title"] + "\n" + a["text"]
                     for body in fake.received("/slack/platform") for a in body["attachments"])


def budget_pages(fake: FakeReceivers, action: str = "trigger") -> list[dict[str, Any]]:
    return [p for p in fake.received("/pagerduty")
            if p["event_action"] == action and "LLMBudget" in p["payload"]["summary"]]


def firing(prom: Service) -> set[tuple[str, str]]:
    alerts = httpx.get(f"{prom.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("period", "")) for a in alerts
            if a["state"] == "firing"}


def test_budget_alerts_reach_slack_and_pagerduty(
        pipeline: tuple[Any, Service, FakeReceivers]) -> None:
    exporter, prom, fake = pipeline

    # 3.2M tokens = $8.00: 80% of the daily budget, 8% of the monthly one.
    post(exporter, gpt4o(3_200_000))
    # Prometheus 2.42 finds a new target only after about 5 s.
    wait_for(lambda: ("LLMBudgetWarning", "daily") in firing(prom), 40,
             "LLMBudgetWarning (daily) to fire in Prometheus")
    assert ("LLMBudgetWarning", "monthly") not in firing(prom)
    text = wait_for(lambda: "Spend: $8.00 of $10.00 (80.0%)" in slack(fake) and slack(fake),
                    20, "the warning on Slack")
    assert "[FIRING:1] LLMBudgetWarning engineering/ai-features" in text
    assert "Department: engineering | Project: ai-features | Period: daily" in text
    assert "#llmbudgetwarning|Runbook>" in text
    assert budget_pages(fake) == []

    # 1M more tokens = $10.50 in all: the daily budget is exceeded -> page + Slack.
    post(exporter, gpt4o(1_000_000))
    [page] = wait_for(lambda: budget_pages(fake), 30, "the PagerDuty page")
    assert page["payload"]["severity"] == "critical"
    assert page["payload"]["summary"] == (
        "[FIRING:1] LLMBudgetExceeded engineering/ai-features: "
        "LLM budget engineering/ai-features (daily) exceeded")
    text = wait_for(lambda: "Spend: $10.50 of $10.00 (105.0%)" in slack(fake) and slack(fake),
                    20, "the exceeded alert on Slack")
    assert "LLMBudgetExceeded" in text
    # The warning of the same budget stops (spend >= limit) and is inhibited meanwhile.
    wait_for(lambda: ("LLMBudgetWarning", "daily") not in firing(prom), 20,
             "the daily warning to stop")
    assert ("LLMBudgetExceeded", "monthly") not in firing(prom)


def test_unpriced_model_alert_reaches_slack(
        pipeline: tuple[Any, Service, FakeReceivers]) -> None:
    exporter, prom, fake = pipeline
    post(exporter, gpt4o(1_000, model="gpt-9-unreleased"))
    text = wait_for(lambda: "LLMUnpricedModel" in slack(fake) and slack(fake), 40,
                    "LLMUnpricedModel on Slack")
    assert "LLM model openai/gpt-9-unreleased has no price" in text
    assert ("LLMUnpricedModel", "") in firing(prom)
    assert budget_pages(fake) == []
