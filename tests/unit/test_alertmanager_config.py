"""Alertmanager config: amtool checks, one routing case per route, secrets, templates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.binaries import find_binary

ROOT = Path(__file__).resolve().parents[2]
AM = ROOT / "alertmanager"
CONFIG = AM / "alertmanager.yml"
CASES: list[dict[str, Any]] = yaml.safe_load((AM / "tests" / "routes.yml").read_text())
SECRETS_DIR = "/etc/alertmanager/secrets/"


def config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_amtool_check_config() -> None:
    amtool = find_binary("amtool")
    result = subprocess.run([amtool, "check-config", str(CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 inhibit rules" in result.stdout
    assert "3 receivers" in result.stdout
    assert "1 templates" in result.stdout


def routes_test(receivers: list[str], labels: dict[str, str]) -> subprocess.CompletedProcess[str]:
    amtool = find_binary("amtool")
    return subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={CONFIG}",
         f"--verify.receivers={','.join(receivers)}",
         *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_route(case: dict[str, Any]) -> None:
    result = routes_test(case["receivers"], case["labels"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ",".join(case["receivers"])


def test_route_check_detects_a_wrong_receiver() -> None:
    """Control: --verify.receivers really fails when the expectation is wrong."""
    result = routes_test(["slack-platform"], {"severity": "critical", "department": "x"})
    assert result.returncode == 1


def test_cases_cover_every_receiver_and_route() -> None:
    cfg = config()
    expected = {r for case in CASES for r in case["receivers"]}
    assert expected == {r["name"] for r in cfg["receivers"]}
    assert {r["receiver"] for r in cfg["route"]["routes"]} <= expected


def test_route_tree_shape() -> None:
    route = config()["route"]
    assert route["group_by"] == ["alertname", "department", "project"]
    first = route["routes"][0]
    assert first == {"receiver": "pagerduty", "matchers": ['severity="critical"'],
                     "continue": True}
    # The last route is a catch-all, so a critical alert that only matched PagerDuty still
    # reaches Slack.
    assert route["routes"][-1] == {"receiver": "slack-platform"}


def test_inhibition_exceeded_silences_warning_of_same_budget_only() -> None:
    assert config()["inhibit_rules"] == [{
        "source_matchers": ['alertname="LLMBudgetExceeded"'],
        "target_matchers": ['alertname="LLMBudgetWarning"'],
        "equal": ["department", "project", "period"],
    }]


def test_secrets_only_from_files_under_the_secrets_dir() -> None:
    cfg = config()
    text = CONFIG.read_text()
    for key in ("api_url", "routing_key", "service_key", "slack_api_url", "http_config"):
        assert not re.search(rf"^\s*{key}:", text, re.M), f"inline {key}"
    readme = (AM / "secrets" / "README.md").read_text()
    files = []
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            files.append(slack["api_url_file"])
            assert slack["send_resolved"] is True
        for pd in receiver.get("pagerduty_configs", []):
            files.append(pd["routing_key_file"])
            assert pd["send_resolved"] is True
    assert len(files) == 3
    for path in files:
        assert path.startswith(SECRETS_DIR), path
        assert f"`{path.removeprefix(SECRETS_DIR)}`" in readme, f"{path} not documented"


def test_secret_files_are_gitignored_but_readme_is_not() -> None:
    git = find_binary("git")
    ignored = subprocess.run([git, "check-ignore", "-q", "alertmanager/secrets/slack_api_url"],
                             cwd=ROOT, timeout=30)
    assert ignored.returncode == 0
    kept = subprocess.run([git, "check-ignore", "-q", "alertmanager/secrets/README.md"],
                          cwd=ROOT, timeout=30)
    assert kept.returncode == 1


def test_slack_configs_use_the_templates() -> None:
    for receiver in config()["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert slack["title"] == '{{ template "llm.slack.title" . }}'
            assert slack["text"] == '{{ template "llm.slack.text" . }}'


def test_templates_range_over_alerts_not_common_annotations() -> None:
    for path in (AM / "templates").glob("*.tmpl"):
        text = path.read_text()
        code = re.sub(r"\{\{/\*.*?\*/\}\}", "", text, flags=re.S)  # drop comments
        assert "CommonAnnotations" not in code, path.name
        assert "range" in code and ".Alerts" in code


def render(template: str) -> str:
    amtool = find_binary("amtool")
    result = subprocess.run(
        [amtool, "template", "render", f"--template.glob={AM / 'templates'}/*.tmpl",
         f"--template.text={{{{ template \"{template}\" . }}}}",
         f"--template.data={AM / 'tests' / 'template-data.json'}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_slack_title_renders() -> None:
    assert render("llm.slack.title") == "[FIRING:1] LLMBudgetWarning engineering/ai-features"


def test_slack_text_shows_every_alert_of_a_mixed_group() -> None:
    """Two alerts whose annotations differ (so CommonAnnotations is empty): both appear
    with their own period, spend, limit, percentage and links."""
    text = render("llm.slack.text")
    daily, monthly = text.split("\n\n")
    assert daily.splitlines() == [
        "*FIRING (warning): LLM budget engineering/ai-features (daily) passed its warning "
        "threshold*",
        "Department: engineering | Project: ai-features | Period: daily",
        "Spend: $8.00 of $10.00 (80.0%)",
        "engineering/ai-features has spent $8.00 of its daily budget of $10.00 (80.0%), above "
        "the warning threshold of 80%.",
        "<http://localhost:3000/d/llm-budgets/llm-budgets?var-department=engineering"
        "&var-project=ai-features|Dashboard> | <https://github.com/llm-cost-exporter/"
        "llm-cost-exporter/blob/main/prometheus/runbook.md#llmbudgetwarning|Runbook>",
    ]
    assert monthly.startswith("*RESOLVED (warning): LLM budget engineering/ai-features "
                              "(monthly)")
    assert "Period: monthly" in monthly
    assert "Spend: $85.50 of $100.00 (85.5%)" in monthly


def test_slack_color_and_pagerduty_description() -> None:
    assert render("llm.slack.color") == "warning"
    assert render("llm.pagerduty.description") == (
        "[FIRING:1] LLMBudgetWarning engineering/ai-features: LLM budget "
        "engineering/ai-features (daily) passed its warning threshold")
