"""Every PromQL expression of the monitoring bundle, ready to send to a real Prometheus.

Sources: the `expr` of every recording and alerting rule in prometheus/rules/*.yml, and every
target and query-variable of grafana/dashboards/*.json with Grafana's variables substituted:
  - dashboard variables ($department, ${project}, ${model:regex}, [[period]], ...) become `.*`
    in regex matchers (=~, !~) and a placeholder value in exact matchers (=, !=);
  - Grafana's interval variables become durations ($__rate_interval -> 5m, $__range -> 1h);
  - `label_values(selector, label)` (a Grafana function) becomes `group by (label) (selector)`.
Alert annotation templates build queries with printf at run time and are not included:
`promtool test rules` (prometheus/tests/) evaluates them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
DASHBOARD_FILES = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

# Grafana's built-in time variables. 5m covers several 15s scrapes, as $__rate_interval would.
BUILTIN_DURATIONS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "60000",
}
EXACT_PLACEHOLDER = "placeholder"

# $name, ${name}, ${name:format}, [[name]]
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)\]\]")
# A label matcher whose value holds a variable: label=~"...$x...".
_MATCHER = re.compile(r'(?P<op>=~|!~|!=|=)\s*"(?P<value>[^"]*)"')
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<args>.*)\)\s*$", re.S)


@dataclass(frozen=True)
class PromQLExpr:
    """One expression: where it comes from (for error messages) and the PromQL to run."""

    source: str
    expr: str


def _name(match: re.Match[str]) -> str:
    return next(group for group in match.groups() if group)


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana variables so that Prometheus can parse and run `expr`."""

    def in_matcher(match: re.Match[str]) -> str:
        op, value = match.group("op"), match.group("value")
        if not _VARIABLE.search(value):
            return match.group(0)
        if op in ("=~", "!~"):
            return f'{op}".*"'
        return f'{op}"{EXACT_PLACEHOLDER}"'

    result = _MATCHER.sub(in_matcher, expr)

    def builtin(match: re.Match[str]) -> str:
        name = _name(match)
        if name not in BUILTIN_DURATIONS:
            raise ValueError(f"unknown Grafana variable ${name} outside a label matcher: {expr}")
        return BUILTIN_DURATIONS[name]

    return _VARIABLE.sub(builtin, result)


def label_values_to_promql(query: str) -> str | None:
    """`label_values(sel, label)` -> `group by (label) (sel)`; None for `label_values(label)`."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        return query  # already PromQL (query_result(...) style variables are not used here)
    args = match.group("args")
    selector, sep, label = args.rpartition(",")
    if not sep:
        return None
    return f"group by ({label.strip()}) ({selector.strip()})"


def rule_expressions(files: Iterable[Path] = RULE_FILES) -> list[PromQLExpr]:
    out: list[PromQLExpr] = []
    for path in files:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                source = f"{path.relative_to(ROOT)}: {group['name']}/{name}"
                out.append(PromQLExpr(source, rule["expr"].strip()))
    return out


def _panels(panels: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels collapsed inside a row


def dashboard_expressions(files: Iterable[Path] = DASHBOARD_FILES) -> list[PromQLExpr]:
    out: list[PromQLExpr] = []
    for path in files:
        board = json.loads(path.read_text())
        rel = path.relative_to(ROOT)
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            promql = label_values_to_promql(query)
            if promql is not None:
                out.append(PromQLExpr(f"{rel}: variable {var['name']}",
                                      substitute_grafana_variables(promql)))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append(PromQLExpr(
                        f"{rel}: panel {panel['id']} {panel['title']!r} target {target['refId']}",
                        substitute_grafana_variables(target["expr"])))
    return out


def all_expressions() -> list[PromQLExpr]:
    """Every rule and dashboard expression, in a stable order."""
    return rule_expressions() + dashboard_expressions()
