"""Every rule and dashboard query returns data from a real Prometheus scraping the real exporter.

tests/e2e/test_monitoring_promql.py proves that every expression *parses*; an expression that
names a metric or label the exporter does not expose, or aggregates away a label its consumer
needs, still parses and silently returns nothing. This module closes that gap:

- one real exporter (with a proxy upstream pointing at the fake provider) is fed twice: every
  example payload, proxied calls (successes and upstream 500s), an unpriced model, rejected
  ingest requests and budget spend — once before Prometheus's first scrape and once after it,
  so every counter has at least two different samples and every rate is non-zero;
- one real Prometheus scrapes it every second with the repository's rule files loaded;
- each recording rule and each dashboard query (Grafana variables set to "All") must return at
  least one series with a finite non-zero value, carrying the labels its consumer reads (the
  recording rule's level, the legend's {{label}}s, a table's columns);
- each alert expression must parse; where the test data can make its condition hold it must
  return the expected series, and where it cannot (history a fresh Prometheus does not have,
  a broken ledger) its operands must return series and the alert itself must stay quiet.

The stack starts once per module (about 15 s, most of it Prometheus 2.42 discovering its
targets); each expression is its own test id.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from e2e.test_exporter_process import payload_events

from conftest import ExporterProcess, free_port, metric_value
from fixtures.fake_provider import FakeProvider
from helpers.monitoring import Service, prometheus, wait_for
from helpers.promql import (
    DASHBOARD_FILES,
    RULE_FILES,
    PromQLExpr,
    dashboard_expressions,
    rule_expressions,
)

ROOT = Path(__file__).resolve().parents[2]
TEAM = {"X-LLM-Department": "engineering", "X-LLM-Project": "ai-features"}
# Nothing listens on port 1: a second target of the exporter's job that is always down, so
# LLMExporterDown's condition really holds (for that target only).
DEAD_TARGET = "127.0.0.1:1"
# gpt-4o input is $2.50 per 1M tokens (list price in the pinned genai-prices).
USD_2_50 = 1_000_000

# Budgets cover the departments/projects of payload_events() (engineering/ai-features,
# engineering/search, data-science/*), with limits small enough that their utilisation is a
# visible percentage, plus one scope per budget alert whose condition the data makes hold.
EXPORTER_CONFIG: dict[str, Any] = {
    "budgets": [
        {"department": "engineering", "project": "ai-features", "daily_usd": 1,
         "monthly_usd": 20},
        {"department": "engineering", "project": "search", "monthly_usd": 10},
        {"department": "data-science", "project": "*", "daily_usd": 0.5, "monthly_usd": 10,
         "timezone": "Asia/Ho_Chi_Minh"},
        # Monthly, not daily: a test run crossing midnight must not reset the spend.
        # $2.50 of $3: 83%, past the 80% warning ratio and under the limit.
        {"department": "engineering", "project": "budget-warning", "monthly_usd": 3},
        # $2.50 of $2: exceeded.
        {"department": "engineering", "project": "budget-exceeded", "monthly_usd": 2},
        # $2.50 before the first scrape, $5.00 after: under the limit, but the burn rate of
        # the last hour ($2.50/h at least) overspends it unless the month ends within 15 s.
        {"department": "engineering", "project": "budget-forecast", "monthly_usd": 5.01},
    ],
}


# -- the stack --------------------------------------------------------------------------------
@dataclass
class Stack:
    exporter: ExporterProcess
    prom: Service
    fake: FakeProvider
    metrics_after_feed: str  # the exporter's /metrics once everything was fed


def gpt4o(project: str, input_tokens: int) -> dict[str, Any]:
    return {"department": "engineering", "project": project, "provider": "openai",
            "model": "gpt-4o", "tokens": {"input": input_tokens}, "latency_seconds": 1.2}


def post(exporter: ExporterProcess, events: list[dict[str, Any]]) -> None:
    response = exporter.post_usage(events)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": len(events), "duplicates": 0}, response.text


def reject(exporter: ExporterProcess, times: int) -> None:
    """Ingest requests the exporter refuses (no model, no usage): reason="invalid"."""
    for _ in range(times):
        response = exporter.post_usage({"provider": "openai", "department": "engineering"})
        assert response.status_code == 422, response.text


def proxy_calls(exporter: ExporterProcess, fake: FakeProvider, ok: int, failed: int) -> None:
    """Calls through the proxy with the openai SDK: `failed` of them get an upstream 500."""
    client = openai.OpenAI(base_url=f"{exporter.url}/openai/v1", api_key="sk-client-key",
                           default_headers=TEAM, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "How much did we spend?"}]
    for i in range(ok):
        if i % 2:  # streams too: usage then comes from the final chunk
            for _ in client.chat.completions.create(
                    model="gpt-4o", messages=messages, stream=True,
                    stream_options={"include_usage": True}):
                pass
        else:
            client.chat.completions.create(model="gpt-4o", messages=messages)
    fake.mode = "error500"
    try:
        for _ in range(failed):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="gpt-4o", messages=messages)
    finally:
        fake.mode = "ok"


def feed_before_first_scrape(exporter: ExporterProcess, fake: FakeProvider) -> None:
    # Every example payload (six providers; includes vllm's llama-3.1-70b-internal, which has
    # no price in this config: the unpriced model).
    post(exporter, payload_events())
    proxy_calls(exporter, fake, ok=2, failed=1)
    post(exporter, [gpt4o("budget-warning", USD_2_50), gpt4o("budget-exceeded", USD_2_50),
                    gpt4o("budget-forecast", USD_2_50),
                    # Creates the spike project's series, so its later jump is an increase.
                    gpt4o("spike", 4_000)])
    reject(exporter, 1)


def feed_after_first_scrape(exporter: ExporterProcess, fake: FakeProvider) -> None:
    # The same payloads again as new calls: every usage series (tokens, cost, reasoning,
    # latency buckets, unpriced) moves, so rates and increases are non-zero.
    post(exporter, [{**event, "request_id": f"{event['request_id']}-again"}
                    for event in payload_events()])
    # 25 proxied calls in the window, 3 failed upstream: 12% > 5% with >= 20 requests.
    proxy_calls(exporter, fake, ok=22, failed=3)
    post(exporter, [gpt4o("budget-forecast", USD_2_50),
                    # $120 in a few seconds: over the spike alert's $20/h and $100/24h floors.
                    gpt4o("spike", 48 * USD_2_50)])
    # 7 more rejected reports within 10 minutes: over LLMExporterIngestErrors' 5.
    reject(exporter, 7)


def prometheus_config(exporter_port: int) -> dict[str, Any]:
    """prometheus/prometheus.yml (its job name, which the rules select on) with 1 s intervals,
    the repository's rule files, the test exporter and a dead target, and no Alertmanager."""
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(path) for path in RULE_FILES]
    config.pop("alerting", None)
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}", DEAD_TARGET]}]
    return config


def query(prom: Service, expr: str) -> list[dict[str, Any]]:
    """The series of an instant query now; fails unless Prometheus answers 200 / success."""
    response = httpx.post(f"{prom.url}/api/v1/query", data={"query": expr}, timeout=10)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text}\n{expr}"
    body = response.json()
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector", body["data"]
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def rule_groups_evaluated_after(prom: Service, moment: float) -> bool:
    groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    # lastEvaluation is the start of the last *completed* evaluation of the group.
    return bool(groups) and all(
        datetime.fromisoformat(group["lastEvaluation"]).timestamp() > moment
        for group in groups)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Module-scoped, so the function-scoped exporter_factory cannot be used: this is what it
    # does, once for the module.
    workdir: Path = tmp_path_factory.mktemp("promql-against-exporter")
    with ExitStack() as cleanup:
        fake = FakeProvider().start()
        cleanup.callback(fake.stop)
        config = {**EXPORTER_CONFIG, "ledger": {"path": str(workdir / "ledger.db")},
                  "upstreams": [{"name": "openai", "base_url": fake.url, "format": "openai"}]}
        config_path = workdir / "exporter.yaml"
        config_path.write_text(yaml.safe_dump(config))
        exporter = ExporterProcess(config_path, free_port(), log_path=workdir / "exporter.log")
        cleanup.callback(exporter.stop)
        exporter.start()
        # A bad config offered for reload is refused: the exporter keeps running on the old
        # one and reports the failed reload, which LLMExporterConfigReloadFailed reads.
        config_path.write_text(yaml.safe_dump({**config, "budgets": [{"department": "x"}]}))
        assert httpx.post(f"{exporter.url}/-/reload", timeout=10).status_code == 400

        feed_before_first_scrape(exporter, fake)
        prom = cleanup.enter_context(
            prometheus(workdir / "prometheus", prometheus_config(exporter.port)))
        target = f'instance="127.0.0.1:{exporter.port}"'
        # Prometheus 2.42 discovers its targets about 5 s after start.
        wait_for(lambda: query(prom, f"llm_cost_usd_total{{{target}}}"), 30,
                 "the first scrape of the exporter")

        feed_after_first_scrape(exporter, fake)
        fed_at = time.time()
        # Every counter was committed before its 202/200 answer, so a scrape that started
        # after `fed_at` holds all of it; then every rule group must evaluate once more.
        wait_for(lambda: any(float(s["value"][1]) > fed_at for s in query(
            prom, f"timestamp(up{{{target}}})")), 20, "a scrape after the second feed")
        seen_at = time.time()
        wait_for(lambda: rule_groups_evaluated_after(prom, seen_at), 20,
                 "every rule group to evaluate the second feed")
        yield Stack(exporter, prom, fake, exporter.metrics())


# -- what each expression's consumer needs ---------------------------------------------------
RULES: dict[str, dict[str, Any]] = {
    rule.get("record") or rule["alert"]: rule
    for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
    for rule in group["rules"]}
RULE_EXPRS = {item.source.rsplit("/", 1)[1]: item for item in rule_expressions()}
RECORDS = [name for name, rule in RULES.items() if "record" in rule]
ALERTS = [name for name, rule in RULES.items() if "alert" in rule]
DASHBOARD_EXPRS = dashboard_expressions()

# Labels a recording rule's level (before the first colon) promises, per the naming
# convention level:metric:operations. `budget:` is in the shape of budget scopes.
LEVEL_LABELS = ("department", "project", "period", "provider", "model", "token_type")
SPECIAL_LEVELS = {"budget": frozenset({"department", "project"})}


def level_labels(record: str) -> frozenset[str]:
    level = record.split(":", 1)[0]
    if level in SPECIAL_LEVELS:
        return SPECIAL_LEVELS[level]
    found: list[str] = []
    rest = level
    while rest:
        label = next((lb for lb in LEVEL_LABELS if rest == lb or rest.startswith(lb + "_")),
                     None)
        assert label is not None, f"{record}: unknown label in level {level!r}"
        found.append(label)
        rest = rest[len(label) + 1:]
    return frozenset(found)


_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES_LABEL = re.compile(r",\s*(\w+)\s*\)\s*$")
_TABLE_NON_LABELS = re.compile(r"^(Time|Value( #\w+)?)$")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_label_needs() -> dict[str, frozenset[str]]:
    """For each dashboard expression (keyed like dashboard_expressions()' sources), the labels
    Grafana reads from its series: a variable's label, the {{label}}s of a legend, and the
    label columns a table renames."""
    needs: dict[str, frozenset[str]] = {}
    for path in DASHBOARD_FILES:
        board = json.loads(path.read_text())
        rel = path.relative_to(ROOT)
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") == "query":
                query_text = var["query"]["query"] if isinstance(var["query"], dict) \
                    else var["query"]
                match = _LABEL_VALUES_LABEL.search(query_text)
                needs[f"{rel}: variable {var['name']}"] = frozenset(
                    [match.group(1)] if match else [])
        for panel in _panels(board.get("panels", [])):
            columns = {name for t in panel.get("transformations", []) if t["id"] == "organize"
                       for name in t["options"].get("renameByName", {})
                       if not _TABLE_NON_LABELS.match(name)}
            for target in panel.get("targets", []):
                if "expr" in target:
                    labels = set(_LEGEND.findall(target.get("legendFormat", "")))
                    if target.get("format") == "table":
                        labels |= columns
                    source = (f"{rel}: panel {panel['id']} {panel['title']!r} "
                              f"target {target['refId']}")
                    needs[source] = frozenset(labels)
    return needs


DASHBOARD_NEEDS = dashboard_label_needs()


def annotation_labels(alert: str) -> frozenset[str]:
    """Labels the alert's annotations print: its series must carry them."""
    text = json.dumps(RULES[alert].get("annotations", {}))
    return frozenset(re.findall(r"\$labels\.(\w+)", text))


@dataclass(frozen=True)
class AlertCase:
    """How one alert is checked against the fed exporter.

    `holds`: labels of a series the whole expression must return (the test data makes its
    condition true). `probes`: sub-expressions, copied verbatim from the expression, that must
    each return series; an `offset` in them is dropped, since a fresh Prometheus has no
    history. When `holds` is None, `why` says why the condition cannot be made true here, and
    the alert must return nothing (the exporter is healthy, there is no history).
    """

    holds: dict[str, str] | None
    probes: tuple[str, ...] = ()
    why: str = ""


ALERT_CASES: dict[str, AlertCase] = {
    "LLMBudgetWarning": AlertCase(
        {"department": "engineering", "project": "budget-warning", "period": "monthly"}),
    "LLMBudgetExceeded": AlertCase(
        {"department": "engineering", "project": "budget-exceeded", "period": "monthly"}),
    "LLMBudgetForecastOverspend": AlertCase(
        {"department": "engineering", "project": "budget-forecast", "period": "monthly"}),
    "LLMSpendSpike": AlertCase(
        None,
        probes=(
            # The comparisons against yesterday and last week: without their offset (a fresh
            # Prometheus has no series a day or a week ago), the operands must exist with
            # department and project, or the comparison could never match.
            "department_project:llm_cost_usd:increase1h offset 1d",
            "department_project:llm_cost_usd:increase1h offset 1w",
            "department_project:llm_cost_usd:increase1d offset 1d",
            # The floors: the $120 spike in engineering/spike passes both.
            "department_project:llm_cost_usd:increase1h >= 20",
            "department_project:llm_cost_usd:increase1d >= 100",
        ),
        why="compares the last hour/day with the same window 1 day and 1 week ago"),
    "LLMUnpricedModel": AlertCase(
        {"provider": "vllm", "model": "llama-3.1-70b-internal"},
        # The `unless ... offset 1h` branch is true for every series on a fresh Prometheus,
        # so check the increase branch on its own: the model was called between scrapes.
        probes=("sum by (provider, model) (increase(llm_unpriced_requests_total[1h])) > 0",)),
    "LLMExporterDown": AlertCase({"job": "llm-cost-exporter", "instance": DEAD_TARGET}),
    "LLMExporterIngestErrors": AlertCase({"reason": "invalid"}),
    "LLMExporterLedgerErrors": AlertCase(
        None,
        probes=("llm_exporter_ledger_up",
                "increase(llm_exporter_ledger_write_errors_total[10m])"),
        why="needs a failing ledger: breaking the shared exporter's ledger would stop it "
            "recording the data every other expression here reads"),
    # The stack offers the exporter a bad config for reload right after it starts.
    "LLMExporterConfigReloadFailed": AlertCase({"job": "llm-cost-exporter"}),
    "LLMProxyUpstreamErrorRatioHigh": AlertCase({"provider": "openai"}),
}


# -- checks -----------------------------------------------------------------------------------
def _id(source: str) -> str:
    """Short test ids: the rule name, `board/panel title/refId` or `board/variable name`."""
    match = re.match(r"grafana/dashboards/(?P<board>[^/]+)\.json: "
                     r"(?:panel \d+ '(?P<title>.*)' target (?P<ref>\w+)|variable (?P<var>\w+))$",
                     source)
    if match is None:
        return source.rsplit("/", 1)[-1]
    if match["var"]:
        return f"{match['board']}/variable {match['var']}"
    return f"{match['board']}/{match['title']}/{match['ref']}"


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def _labels(sample: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in sample["metric"].items() if k != "__name__"}


def assert_has_data(series: list[dict[str, Any]], expr: str, needs: frozenset[str]) -> None:
    """At least one series; every series carries `needs`; some value is finite and non-zero
    (a rate over a counter that never moved, or a ratio of two such rates, is not data)."""
    assert series, f"no series for:\n{expr}"
    missing = [_labels(s) for s in series if not needs <= set(s["metric"])]
    assert not missing, f"series without the labels {sorted(needs)}: {missing}\n{expr}"
    values = [_value(s) for s in series]
    assert any(math.isfinite(v) and v != 0 for v in values), \
        f"no finite non-zero value in {series}\n{expr}"


def assert_has_data_or_zero(series: list[dict[str, Any]], expr: str,
                            needs: frozenset[str]) -> None:
    """An alert operand may legitimately be 0 (no ledger write errors): it must exist and
    carry the labels the alert's annotations print."""
    assert series, f"no series for operand:\n{expr}"
    missing = [_labels(s) for s in series if not needs <= set(s["metric"])]
    assert not missing, f"operand series without the labels {sorted(needs)}: {missing}\n{expr}"


def _strip_offsets(expr: str) -> str:
    return re.sub(r"\s+offset\s+\w+", "", expr)


def _normalized(expr: str) -> str:
    return " ".join(expr.split())


def test_every_expression_has_a_case() -> None:
    """The tables above follow the rule and dashboard files: a new alert needs an AlertCase,
    and every dashboard query has its label needs extracted."""
    assert sorted(ALERT_CASES) == sorted(ALERTS)
    assert sorted(RULE_EXPRS) == sorted(RULES)
    assert sorted(DASHBOARD_NEEDS) == sorted(e.source for e in DASHBOARD_EXPRS)
    for name, case in ALERT_CASES.items():
        assert case.holds is not None or (case.probes and case.why), name
        for probe in case.probes:  # probes are the alert's own text, not paraphrases
            assert _normalized(probe) in _normalized(RULES[name]["expr"]), (name, probe)


def test_the_fed_exporter_has_what_the_rules_need(stack: Stack) -> None:
    """The test data is what the cases above assume (read from the exporter, not Prometheus)."""
    text = stack.metrics_after_feed

    def spend(project: str) -> float | None:
        return metric_value(text, "llm_budget_spend_usd", department="engineering",
                            project=project, period="monthly")

    assert spend("budget-warning") == 2.5
    assert spend("budget-exceeded") == 2.5
    assert spend("budget-forecast") == 5.0
    assert metric_value(text, "llm_unpriced_requests_total", provider="vllm",
                        model="llama-3.1-70b-internal") == 2
    assert metric_value(text, "llm_requests_total", outcome="error", model="gpt-4o") == 4
    assert metric_value(text, "llm_proxy_upstream_errors_total", provider="openai",
                        status_class="5xx") == 4
    assert metric_value(text, "llm_proxy_requests_total", provider="openai") == 28
    assert metric_value(text, "llm_exporter_ingest_rejected_total", reason="invalid") == 8
    assert any(line.startswith("llm_reasoning_tokens_total{") and float(line.split()[-1]) > 0
               for line in text.splitlines())


@pytest.mark.parametrize("name", RECORDS)
def test_recording_rule_returns_series(stack: Stack, name: str) -> None:
    expected = level_labels(name)
    series = query(stack.prom, RULE_EXPRS[name].expr)
    assert_has_data(series, RULE_EXPRS[name].expr, expected)
    # Exactly the level's labels: an extra one (job, instance) would split per replica what
    # the dashboards and alerts treat as one value.
    assert {frozenset(_labels(s)) for s in series} == {expected}, series
    # And Prometheus itself evaluated and stored it under its name.
    assert query(stack.prom, name), f"{name} was not recorded"


@pytest.mark.parametrize("item", DASHBOARD_EXPRS, ids=[_id(e.source) for e in DASHBOARD_EXPRS])
def test_dashboard_query_returns_series(stack: Stack, item: PromQLExpr) -> None:
    assert_has_data(query(stack.prom, item.expr), item.expr, DASHBOARD_NEEDS[item.source])


@pytest.mark.parametrize("name", ALERTS)
def test_alert_expression(stack: Stack, name: str) -> None:
    case = ALERT_CASES[name]
    expr = RULE_EXPRS[name].expr
    needs = annotation_labels(name)
    series = query(stack.prom, expr)  # parses: HTTP 200
    if case.holds is not None:
        assert series, f"{name}: condition does not hold on the test data\n{expr}"
        matching = [s for s in series if case.holds.items() <= s["metric"].items()]
        assert matching, f"{name}: no series with {case.holds} in {series}"
        assert all(needs <= set(s["metric"]) for s in matching), \
            f"{name}: annotations need {sorted(needs)}: {matching}"
    else:
        # Not makeable here (see AlertCase.why); a healthy exporter with no history must not
        # alert, which the expression's own design promises.
        assert series == [], f"{name} holds unexpectedly: {series}"
    for probe in case.probes:
        runnable = _strip_offsets(probe)
        assert_has_data_or_zero(query(stack.prom, runnable), runnable, needs)

