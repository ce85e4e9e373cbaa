"""/metrics as a view of the ledger: committed running totals and budget state."""

from __future__ import annotations

import logging
import platform
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llm_cost_exporter import __version__
from llm_cost_exporter.budgets import budget_statuses
from llm_cost_exporter.config import Config
from llm_cost_exporter.labels import GUARDED, LabelGuard
from llm_cost_exporter.ledger import LATENCY_BUCKETS, Ledger, LedgerUnavailable
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
        yield from self._usage()
        yield from self._budgets()
        yield from self._health()

    def _usage(self) -> Iterator[Metric]:
        totals = self._ledger.totals()
        requests = CounterMetricFamily(
            "llm_requests_total", "LLM calls recorded, by outcome (success, error, client_closed).",
            labels=[*_SERIES, "outcome"])
        tokens = CounterMetricFamily(
            "llm_tokens_total", "Billed tokens by disjoint type; the sum over token_type counts "
            "every billed token exactly once.", labels=[*_SERIES, "token_type"])
        reasoning = CounterMetricFamily(
            "llm_reasoning_tokens_total", "Reasoning/thinking tokens (already inside "
            "token_type=output; do not add them again).", labels=_SERIES)
        cost = CounterMetricFamily("llm_cost_usd_total", "Cost of LLM calls in US dollars.",
                                   labels=_SERIES)
        unpriced = CounterMetricFamily(
            "llm_unpriced_requests_total", "Calls to models with no known price (recorded at "
            "cost 0): add the model to the pricing overrides.", labels=["provider", "model"])
        estimated = CounterMetricFamily(
            "llm_estimated_requests_total", "Calls whose tokens were estimated from the "
            "streamed text because the provider reported no usage.", labels=_SERIES)
        # Per label set without outcome: input, cache_read, cache_write, output, reasoning,
        # estimated; cost kept apart as a Decimal.
        by_series: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * 6)
        cost_by: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
        unpriced_by: dict[tuple[str, str], int] = defaultdict(int)
        for key, t in totals.series.items():
            labels = (key.department, key.project, key.provider, key.model)
            requests.add_metric([*labels, key.outcome], t.requests)
            acc = by_series[labels]
            acc[0] += t.input
            acc[1] += t.cache_read
            acc[2] += t.cache_write
            acc[3] += t.output
            acc[4] += t.reasoning
            acc[5] += t.estimated
            cost_by[labels] += t.cost
            if t.unpriced:
                unpriced_by[(key.provider, key.model)] += t.unpriced
        for labels, acc in by_series.items():
            for i, token_type in enumerate(("input", "cache_read", "cache_write", "output")):
                tokens.add_metric([*labels, token_type], acc[i])
            reasoning.add_metric(list(labels), acc[4])
            estimated.add_metric(list(labels), acc[5])
            # Money stays Decimal up to here; float only for the exposition format.
            cost.add_metric(list(labels), float(cost_by[labels]))
        for (provider, model), count in unpriced_by.items():
            unpriced.add_metric([provider, model], count)
        duration = HistogramMetricFamily(
            "llm_request_duration_seconds", "Latency of LLM calls as reported or measured.",
            labels=["provider", "model"])
        for (provider, model), lat in totals.latency.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), lat.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            duration.add_metric([provider, model], buckets, lat.total)
        yield from (requests, tokens, reasoning, cost, unpriced, estimated, duration)

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
