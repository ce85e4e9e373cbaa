"""The repository's Alertmanager config in a real Alertmanager, with fake Slack and PagerDuty.

Alerts are posted straight to Alertmanager's API, as Prometheus would post them: routing,
inhibition, templates and secret files are exercised; only the grouping waits are shortened.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.monitoring import (
    FakeReceivers,
    Service,
    alertmanager,
    fake_receivers,
    runtime_alertmanager_config,
    wait_for,
)

ROUTING_KEY = "0123456789abcdef0123456789abcdef"


def budget_alert(name: str, severity: str, department: str, project: str, period: str,
                 spend: str, limit: str, pct: str, ends: datetime | None = None) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "labels": {"alertname": name, "severity": severity, "department": department,
                   "project": project, "period": period},
        "annotations": {
            "summary": f"LLM budget {department}/{project} ({period}) {name}",
            "spend_usd": spend, "limit_usd": limit, "utilisation": pct,
            "description": f"{department}/{project} has spent ${spend} of ${limit} ({pct}).",
            "runbook_url": f"https://example.invalid/runbook.md#{name.lower()}",
            "dashboard_url": "http://localhost:3000/d/llm-budgets/llm-budgets",
        },
        "generatorURL": "http://127.0.0.1:9090/graph",
    }
    if ends is not None:
        alert["endsAt"] = ends.isoformat()
    return alert


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Service, FakeReceivers]]:
    with fake_receivers() as fake:
        config = runtime_alertmanager_config(tmp_path / "secrets", fake.url)
        with alertmanager(tmp_path / "am", config) as am:
            yield am, fake


def post(am: Service, alerts: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{am.url}/api/v2/alerts", json=alerts, timeout=10)
    assert response.status_code == 200, response.text


def slack_texts(fake: FakeReceivers, path: str) -> list[str]:
    return [a["text"] for body in fake.received(path) for a in body["attachments"]]


def test_routing_inhibition_templates_and_resolve(stack: tuple[Service, FakeReceivers]) -> None:
    am, fake = stack
    post(am, [
        budget_alert("LLMBudgetExceeded", "critical", "engineering", "ai-features", "daily",
                     "10.50", "10.00", "105.0%"),
        # Same budget (department, project, period): inhibited by the exceeded alert.
        budget_alert("LLMBudgetWarning", "warning", "engineering", "ai-features", "daily",
                     "10.50", "10.00", "105.0%"),
        # Same project, other period: not inhibited.
        budget_alert("LLMBudgetWarning", "warning", "engineering", "ai-features", "monthly",
                     "85.00", "100.00", "85.0%"),
        # Department with its own route.
        budget_alert("LLMBudgetWarning", "warning", "data-science", "*", "monthly",
                     "1700.00", "2000.00", "85.0%"),
    ])

    # Critical: PagerDuty, with the key read from the secret file (trailing newline trimmed).
    [page] = wait_for(lambda: fake.received("/pagerduty"), 20, "the PagerDuty event")
    assert page["routing_key"] == ROUTING_KEY
    assert page["event_action"] == "trigger"
    assert page["payload"]["severity"] == "critical"
    assert page["payload"]["summary"].startswith(
        "[FIRING:1] LLMBudgetExceeded engineering/ai-features: LLM budget")

    def platform_has_both() -> list[str]:
        texts = slack_texts(fake, "/slack/platform")
        joined = "\n".join(texts)
        return texts if "LLMBudgetExceeded" in joined and "(monthly)" in joined else []

    texts = wait_for(platform_has_both, 20, "the exceeded and monthly warning on Slack")
    joined = "\n".join(texts)
    # ... and Slack as well (continue: true), with spend/limit/percentage per alert.
    assert "Spend: $10.50 of $10.00 (105.0%)" in joined
    assert "Period: monthly" in joined and "Spend: $85.00 of $100.00 (85.0%)" in joined
    # The inhibited daily warning was never sent anywhere.
    assert "(daily) LLMBudgetWarning" not in joined

    ds = wait_for(lambda: slack_texts(fake, "/slack/data-science"), 20, "data-science Slack")
    assert "Department: data-science | Project: * | Period: monthly" in ds[0]
    assert "Spend: $1700.00 of $2000.00 (85.0%)" in ds[0]
    assert all("data-science" not in t for t in texts)

    statuses = httpx.get(f"{am.url}/api/v2/alerts", timeout=10).json()
    inhibited = {(a["labels"]["alertname"], a["labels"]["period"])
                 for a in statuses if a["status"]["inhibitedBy"]}
    assert inhibited == {("LLMBudgetWarning", "daily")}

    # Rollover: the exceeded alert resolves; Slack and PagerDuty hear about it.
    post(am, [budget_alert("LLMBudgetExceeded", "critical", "engineering", "ai-features",
                           "daily", "0.00", "10.00", "0.0%",
                           ends=datetime.now(UTC) - timedelta(seconds=1))])
    resolve = wait_for(lambda: [p for p in fake.received("/pagerduty")
                                if p["event_action"] == "resolve"], 20, "PagerDuty resolve")
    assert resolve[0]["dedup_key"] == page["dedup_key"]
    wait_for(lambda: any("*RESOLVED (critical)" in t for t in slack_texts(fake, "/slack/platform")),
             20, "the resolved notification on Slack")
