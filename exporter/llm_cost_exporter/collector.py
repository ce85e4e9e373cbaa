"""/metrics families other than usage: budget state and the exporter's own health."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llm_cost_exporter import __version__
from llm_cost_exporter.budgets import budget_statuses
from llm_cost_exporter.config import Config
from llm_cost_exporter.labels import GUARDED, LabelGuard
from llm_cost_exporter.ledger import Ledger, LedgerUnavailable
from llm_cost_exporter.stats import REJECT_REASONS, ExporterStats

log = logging.getLogger(__name__)
_SERIES = ["department", "project", "provider", "model"]
_BUDGET = ["department", "project", "period"]


class LedgerCollector(Collector):
    def __init__(self, config: Callable[[], Config], ledger: Ledger, now: Callable[[], datetime],
                 guard: LabelGuard, stats: ExporterStats) -> None:
        self._config = config
        self._ledger = ledger
        self._now = now
        self._guard = guard
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        # The usage families (the big ones) are rendered by exposition.UsageRenderer.
        yield from self._budgets()
        yield from self._health()

    def _budgets(self) -> Iterator[Metric]:
        limit = GaugeMetricFamily("llm_budget_limit_usd", "Budget limit in US dollars for the "
                                  "period; project=\"*\" is department-wide.", labels=_BUDGET)
        spend = GaugeMetricFamily("llm_budget_spend_usd", "Spend in the current calendar day or "
                                  "month, in the budget's time zone.", labels=_BUDGET)
        ratio = GaugeMetricFamily("llm_budget_warning_ratio", "Fraction of the limit at which "
                                  "the budget warns.", labels=_BUDGET)
        end = GaugeMetricFamily("llm_budget_period_end_timestamp_seconds", "Unix time at which "
                                "the current budget period ends.", labels=_BUDGET)
        try:
            statuses = budget_statuses(self._config().budgets, self._ledger, self._now())
        except LedgerUnavailable as exc:
            # Better no budget series than wrong ones: alerts see them absent, not at 0.
            log.error("budget spend unavailable", extra={"error": str(exc)})
            statuses = []
        for s in statuses:
            labels = [s.department, s.project, s.period]
            limit.add_metric(labels, float(s.limit))
            spend.add_metric(labels, float(s.spend))
            ratio.add_metric(labels, float(s.warning_ratio))
            end.add_metric(labels, s.period_end.timestamp())
        yield from (limit, spend, ratio, end)

    def _health(self) -> Iterator[Metric]:
        overflow = CounterMetricFamily(
            "llm_label_overflow_total", "Events whose label value was replaced by \"other\" "
            "because labels.max_values_per_label was reached.", labels=["label"])
        for label in GUARDED:
            overflow.add_metric([label], self._guard.overflow[label])
        rejected = CounterMetricFamily("llm_exporter_ingest_rejected_total",
                                       "Ingest requests refused, by reason.", labels=["reason"])
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], self._stats.ingest_rejected[reason])
        errors = CounterMetricFamily("llm_exporter_ledger_write_errors_total",
                                     "Ledger commits that failed (nothing was acknowledged).")
        errors.add_metric([], self._stats.ledger_write_errors)
        up = GaugeMetricFamily("llm_exporter_ledger_up", "1 if the last ledger write or check "
                               "succeeded.")
        up.add_metric([], 1 if self._stats.ledger_up else 0)
        reload_ok = GaugeMetricFamily("llm_exporter_config_last_reload_successful",
                                      "1 if the last configuration load succeeded.")
        reload_ok.add_metric([], 1 if self._stats.config_reload_ok else 0)
        info = GaugeMetricFamily("llm_exporter_build_info", "Build information; always 1.",
                                 labels=["version", "python_version"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield from (overflow, rejected, errors, up, reload_ok, info)
