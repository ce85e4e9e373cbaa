"""Grafana dashboards and provisioning: structure, datasource variable, layout, queries."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.promql import DASHBOARD_FILES, dashboard_expressions

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DS = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "bargauge", "table", "gauge"}
BOARDS = {path.stem: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def test_both_dashboards_exist_with_fixed_unique_uids() -> None:
    assert set(BOARDS) == {"llm-cost-overview", "llm-budgets"}
    uids = [b["uid"] for b in BOARDS.values()]
    assert uids == list(BOARDS)  # uid = file name, so links /d/<uid>/ are stable
    assert len({b["title"] for b in BOARDS.values()}) == 2
    for board in BOARDS.values():
        assert 36 <= board["schemaVersion"] <= 41
        assert "id" not in board or board["id"] is None


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_panel_ids_unique_and_types_allowed(name: str) -> None:
    panels = BOARDS[name]["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert {p["type"] for p in panels} <= PANEL_TYPES
    assert all(p["title"] and p.get("description") for p in panels)


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_grid_positions_fit_and_do_not_overlap(name: str) -> None:
    boxes = []
    for panel in BOARDS[name]["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        boxes.append((panel["title"], g))
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                   and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
        assert not overlap, f"{ta!r} overlaps {tb!r}"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_and_target_uses_the_datasource_variable(name: str) -> None:
    board = BOARDS[name]
    [ds_var] = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, (panel["title"], target["refId"])
            assert target["expr"].strip()
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"] == DS, var["name"]
    # No datasource is named or hard-coded anywhere else in the file.
    text = json.dumps(board)
    assert "llm-prometheus" not in text.replace('"value": "llm-prometheus"', "")


def _variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def test_template_variables() -> None:
    overview = _variables(BOARDS["llm-cost-overview"])
    assert {"datasource", "department", "project", "model"} <= set(overview)
    budgets = _variables(BOARDS["llm-budgets"])
    assert {"datasource", "department", "project"} <= set(budgets)
    for variables in (overview, budgets):
        for name in ("department", "project", "model"):
            if name in variables:
                var = variables[name]
                assert var["query"]["query"].startswith("label_values(")
                assert var["query"]["query"].endswith(f", {name})")
                assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"


OVERVIEW_PANELS = {
    "Month-to-date spend", "Spend today", "Spend by department (selected range)",
    "Spend by model (selected range)", "Spend over time (USD/h)", "Tokens by type (tokens/s)",
    "Requests by outcome (req/s)", "Error ratio by model", "Latency p50 / p95 / p99 by model",
    "Top projects (selected range)", "Unpriced models (selected range)",
}
BUDGET_PANELS = {
    "Utilisation per budget", "Remaining budget (USD)", "Forecast spend at period end vs limit",
    "Burn rate (USD/h)", "Budgets",
}


def _panel(name: str, title: str) -> dict[str, Any]:
    [panel] = [p for p in BOARDS[name]["panels"] if p["title"] == title]
    return panel


def test_required_panels_present() -> None:
    assert {p["title"] for p in BOARDS["llm-cost-overview"]["panels"]} >= OVERVIEW_PANELS
    assert {p["title"] for p in BOARDS["llm-budgets"]["panels"]} >= BUDGET_PANELS


def test_month_to_date_panel_covers_the_month() -> None:
    panel = _panel("llm-cost-overview", "Month-to-date spend")
    assert panel["timeFrom"] == "now/M"
    assert "increase(llm_cost_usd_total{" in panel["targets"][0]["expr"]
    assert "[$__range]" in panel["targets"][0]["expr"]


def test_latency_panel_has_three_quantiles_over_summed_buckets() -> None:
    targets = _panel("llm-cost-overview", "Latency p50 / p95 / p99 by model")["targets"]
    quantiles = [re.match(r"histogram_quantile\(([\d.]+), sum by \(le, provider, model\)",
                          t["expr"]) for t in targets]
    assert [m.group(1) if m else None for m in quantiles] == ["0.5", "0.95", "0.99"]


def test_utilisation_thresholds_at_80_and_100_percent() -> None:
    for title in ("Utilisation per budget", "Highest utilisation"):
        defaults = _panel("llm-budgets", title)["fieldConfig"]["defaults"]
        assert defaults["unit"] == "percentunit"
        steps = [s["value"] for s in defaults["thresholds"]["steps"]]
        assert steps == [None, 0.8, 1]


def test_budget_queries_combine_replicas_with_max() -> None:
    for panel in BOARDS["llm-budgets"]["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert not re.search(r"\bsum\b", expr), (panel["title"], expr)
            # Raw gauges only: recorded series (level:llm_budget_...:op) are already max-ed.
            for gauge in re.findall(r"(?<![:\w])llm_budget_\w+(?![:\w])", expr):
                assert re.search(rf"max by \(department, project, period\) \({gauge}", expr), \
                    (panel["title"], gauge)


def test_usage_queries_honour_the_filters() -> None:
    """Every query on a usage counter of the overview filters department/project/model."""
    for panel in BOARDS["llm-cost-overview"]["panels"]:
        for target in panel["targets"]:
            for selector in re.findall(r"llm_(?:cost_usd|tokens|reasoning_tokens|requests)_total"
                                       r"\{([^}]*)\}", target["expr"]):
                for var in ("department", "project", "model"):
                    assert f'{var}=~"${var}"' in selector, (panel["title"], selector)


def test_every_dashboard_expression_is_substituted() -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 30
    for item in exprs:
        assert "$" not in item.expr and "[[" not in item.expr, item


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = doc["datasources"]
    assert ds["uid"] == "llm-prometheus"
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert ds["isDefault"] is True


def test_dashboard_provider_points_at_the_compose_mount() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-cost.yml").read_text())
    [provider] = doc["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
