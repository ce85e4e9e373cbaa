"""Prometheus config and rules: promtool checks, the unit tests, and static rule hygiene."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.binaries import find_binary
from helpers.promql import all_expressions

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*.test.yml"))
ALERTMANAGER_CONFIG = ROOT / "alertmanager" / "alertmanager.yml"
DASHBOARD_UIDS = {"llm-cost-overview", "llm-budgets"}


def rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def records() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "record" in rule]


def test_files_exist() -> None:
    assert [p.name for p in RULE_FILES] == ["llm-cost-alerts.yml", "llm-cost-recording.yml"]
    assert len(TEST_FILES) >= 4


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(name: str) -> None:
    promtool = find_binary("promtool")
    result = subprocess.run([promtool, "check", "config", name], cwd=PROM,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_promtool_check_rules_lint_fatal() -> None:
    promtool = find_binary("promtool")
    result = subprocess.run([promtool, "check", "rules", "--lint-fatal", *map(str, RULE_FILES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout
    assert f"SUCCESS: {len(records())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = find_binary("promtool")
    result = subprocess.run([promtool, "test", "rules", *(p.name for p in TEST_FILES)],
                            cwd=PROM / "tests", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES), result.stdout


def _unit_tests() -> list[dict[str, Any]]:
    return [test for path in TEST_FILES for test in yaml.safe_load(path.read_text())["tests"]]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested below threshold / pending / resolved"


def test_every_recording_rule_is_tested() -> None:
    exprs = " ".join(case["expr"] for test in _unit_tests()
                     for case in test.get("promql_expr_test", []))
    untested = [r["record"] for r in records() if not re.search(re.escape(r["record"]) + r"\b",
                                                                exprs)]
    assert untested == []


def test_every_test_file_sets_interval_and_eval_order() -> None:
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        assert all("interval" in test for test in doc["tests"]), path.name
        # Recording groups run before the alert groups whose templates read them.
        groups = [g["name"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]]
        assert sorted(doc["group_eval_order"]) == sorted(groups), path.name


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for rule in records():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_alert_labels_and_annotations() -> None:
    runbook = (PROM / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines()
               if line.startswith("## ")}
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook_url", "dashboard_url"):
            assert annotations.get(key), f"{name} lacks {key}"
        url = annotations["runbook_url"]
        assert url.endswith(f"prometheus/runbook.md#{name.lower()}"), url
        assert name.lower() in anchors, f"runbook.md has no section for {name}"
        uid = re.search(r"/d/([\w-]+)/", annotations["dashboard_url"])
        assert uid and uid.group(1) in DASHBOARD_UIDS, annotations["dashboard_url"]


def test_runbook_has_no_section_without_alert() -> None:
    runbook = (PROM / "runbook.md").read_text()
    sections = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    assert sections == {rule["alert"] for rule in alerts()}


def test_inhibited_alerts_always_carry_the_equal_labels() -> None:
    """Inhibition with `equal:` also matches when a label is missing on both sides, so every
    expected firing of an alert named in an inhibit rule must have all the equal labels."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    for inhibit in config["inhibit_rules"]:
        names = {m.split("=", 1)[1].strip('"')
                 for m in inhibit["source_matchers"] + inhibit["target_matchers"]}
        seen = 0
        for test in _unit_tests():
            for case in test.get("alert_rule_test", []):
                if case["alertname"] in names:
                    for alert in case.get("exp_alerts") or []:
                        seen += 1
                        missing = set(inhibit["equal"]) - set(alert["exp_labels"])
                        assert not missing, (case["alertname"], missing)
        assert seen >= len(names)
        for rule in alerts():
            if rule["alert"] in names:
                assert "by (department, project, period)" in rule["expr"], rule["alert"]


def test_budget_alerts_resolve_at_rollover() -> None:
    """Each budget alert has a tested case after its firing where it is gone again."""
    for name in ("LLMBudgetWarning", "LLMBudgetExceeded"):
        timeline: list[tuple[str, bool]] = []
        for test in _unit_tests():
            for case in test.get("alert_rule_test", []):
                if case["alertname"] == name:
                    timeline.append((case["eval_time"], bool(case.get("exp_alerts"))))
        fired = [i for i, (_, on) in enumerate(timeline) if on]
        assert fired and any(not on for _, on in timeline[fired[-1] + 1:]), (name, timeline)


# The mistakes listed in shared/reference/alerting-notes.md, checked on every expression of
# the rules and the dashboards.
NEWER_THAN_2_42 = ("sort_by_label", "limitk", "limit_ratio", "histogram_avg", "histogram_stddev",
                   "info", "double_exponential_smoothing", "first_over_time", "holt_winters")


@pytest.mark.parametrize("item", all_expressions(), ids=lambda e: e.source)
def test_expression_hygiene(item: Any) -> None:
    expr = item.expr
    for fn in NEWER_THAN_2_42:
        assert not re.search(rf"\b{fn}\s*\(", expr), f"{fn}() is not in Prometheus 2.42"
    # No rate/increase/irate on a gauge (budget gauges, ledger_up, ...).
    assert not re.search(r"\b(rate|irate|increase)\s*\(\s*llm_budget_", expr)
    assert not re.search(r"\b(rate|irate|increase)\s*\(\s*llm_exporter_(ledger_up|config)", expr)
    # Budget gauges are the same on every replica: max, never sum.
    assert not re.search(r"\bsum\b(\s*(by|without)\s*\([^)]*\))?\s*\(\s*llm_budget_", expr)
    # rate/increase only on counters or histogram buckets.
    for metric in re.findall(r"\b(?:rate|irate|increase)\s*\(\s*([a-z_:]+)", expr):
        assert metric.endswith(("_total", "_bucket")), metric
    # histogram_quantile over buckets aggregated by le first.
    for match in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,\s*(\w+)", expr):
        assert match.group(1) == "sum", expr
        assert re.search(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(le\b", expr), expr


def test_compose_config_is_the_native_config_with_service_names() -> None:
    native = yaml.safe_load((PROM / "prometheus.yml").read_text())
    compose = yaml.safe_load((PROM / "prometheus.compose.yml").read_text())
    # Only compose has the PostgreSQL profile's replicas (found by DNS): compare the rest.
    replicas = compose["scrape_configs"][0].pop("dns_sd_configs")
    assert replicas == [{"names": ["exporter-replica"], "type": "A", "port": 9464}]
    text = yaml.safe_dump(native).replace("127.0.0.1:9093", "alertmanager:9093")
    text = text.replace("127.0.0.1:9464", "exporter:9464")
    assert yaml.safe_load(text) == compose


def test_native_config_settings() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "llm-cost-exporter"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]
    am = config["alerting"]["alertmanagers"][0]["static_configs"]
    assert am == [{"targets": ["127.0.0.1:9093"]}]
