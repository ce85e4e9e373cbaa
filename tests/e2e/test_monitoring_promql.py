"""Every PromQL expression of the rules and dashboards parses in a real Prometheus.

One Prometheus with no scrape targets (and the bundle's rules loaded) answers an instant
query per expression: a syntax error gives HTTP 400, anything else must be a success.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers.monitoring import Service, prometheus
from helpers.promql import RULE_FILES, PromQLExpr, all_expressions

EXPRESSIONS = all_expressions()


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir: Path = tmp_path_factory.mktemp("prometheus-promql")
    config = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
              "rule_files": [str(p) for p in RULE_FILES]}
    with prometheus(workdir, config) as service:
        yield service


def test_extraction_finds_rules_and_dashboards() -> None:
    sources = [e.source for e in EXPRESSIONS]
    assert sum(s.startswith("prometheus/rules/") for s in sources) == 28
    assert sum(s.startswith("grafana/dashboards/llm-cost-overview.json") for s in sources) >= 20
    assert sum(s.startswith("grafana/dashboards/llm-budgets.json") for s in sources) >= 12


def test_prometheus_loaded_every_rule_group(empty_prometheus: Service) -> None:
    groups = httpx.get(f"{empty_prometheus.url}/api/v1/rules", timeout=5).json()["data"]
    names = {g["name"] for g in groups["groups"]}
    assert names == {"llm-cost-spend", "llm-cost-traffic", "llm-cost-budgets", "llm-budgets",
                     "llm-spend", "llm-exporter", "llm-proxy"}
    assert all(rule["health"] != "err" for g in groups["groups"] for rule in g["rules"])


def test_a_syntax_error_is_reported_as_400(empty_prometheus: Service) -> None:
    """Control for the test below: a broken expression is rejected, not silently empty."""
    response = httpx.post(f"{empty_prometheus.url}/api/v1/query",
                          data={"query": "sum by (le (rate(x[5m]))"}, timeout=10)
    assert response.status_code == 400
    assert response.json()["errorType"] == "bad_data"


@pytest.mark.parametrize("item", EXPRESSIONS, ids=[e.source for e in EXPRESSIONS])
def test_expression_parses_and_runs(empty_prometheus: Service, item: PromQLExpr) -> None:
    response = httpx.post(f"{empty_prometheus.url}/api/v1/query", data={"query": item.expr},
                          timeout=10)
    assert response.status_code == 200, f"{item.source}: {response.text}\n{item.expr}"
    assert response.json()["status"] == "success"
