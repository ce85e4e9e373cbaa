"""What a running exporter holds, built from config, and how it takes a new config."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from llm_cost_exporter.budget_guard import BudgetGuard
from llm_cost_exporter.clock import Clock
from llm_cost_exporter.collector import LedgerCollector
from llm_cost_exporter.commit_pipe import PipeCommitQueue
from llm_cost_exporter.commit_queue import CommitQueue
from llm_cost_exporter.config import Config, load_config
from llm_cost_exporter.exposition import UsageRenderer
from llm_cost_exporter.ingest import IngestLimits
from llm_cost_exporter.labels import LabelGuard
from llm_cost_exporter.ledger import Ledger
from llm_cost_exporter.price_db import GenAIPricesDB
from llm_cost_exporter.pricer import Pricer
from llm_cost_exporter.proxy.handler import Proxy
from llm_cost_exporter.recorder import Recorder
from llm_cost_exporter.stats import ExporterStats
from llm_cost_exporter.validation import ConfigError

log = logging.getLogger(__name__)

# Settings a reload cannot change in a running process: they need a restart.
_RESTART_ONLY = ("listen_host", "listen_port", "ledger", "tls", "allow_public_listen")


class ExporterState:
    """Everything a running exporter holds; one per app instance."""

    def __init__(self, config: Config, ledger: Ledger, clock: Clock,
                 price_db: GenAIPricesDB | None) -> None:
        self.config = config
        self.ledger = ledger
        self.clock = clock
        self.price_db = price_db
        self.stats = ExporterStats()
        self.guard = LabelGuard(config.labels.max_values_per_label, _known(config))
        label_values = getattr(ledger, "label_values", None)
        if label_values is not None:
            for label, values in label_values().items():
                self.guard.seed(label, values)
        self.commits: CommitQueue | PipeCommitQueue = (
            PipeCommitQueue(ledger) if hasattr(ledger, "send_record")  # type: ignore[arg-type]
            else CommitQueue(ledger, inline=getattr(ledger, "cheap_commits", False)))
        self.budget_guard = self._budget_guard(config)
        self.recorder = Recorder(Pricer(config.price_table, price_db), self.guard, self.commits,
                                 self.budget_guard)
        self.proxy = Proxy(config, self.recorder, self.budget_guard, clock, self.stats)
        self.renderer = UsageRenderer()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(lambda: self.config, ledger, clock.now,
                                               self.guard, self.stats))
        self.registry.register(self.proxy.metrics)
        self.limits = _limits(config)

    def _budget_guard(self, config: Config) -> BudgetGuard:
        # A ledger shared over the network is refreshed off the event loop.
        return BudgetGuard(config.budgets, self.ledger, self.clock,
                           config.proxy.budget_refresh_seconds,
                           background=getattr(self.ledger, "shared", False))

    def apply(self, config: Config) -> list[str]:
        """Switch to a new, already validated config. Returns the settings it ignored."""
        ignored = [k for k in _RESTART_ONLY if getattr(config, k) != getattr(self.config, k)]
        self.guard.reconfigure(config.labels.max_values_per_label, _known(config))
        self.budget_guard = self._budget_guard(config)
        self.recorder.pricer = Pricer(config.price_table, self.price_db)
        self.recorder.budgets = self.budget_guard
        self.proxy.reconfigure(config, self.budget_guard)
        self.limits = _limits(config)
        self.config = config
        return ignored

    def reload(self, env: Mapping[str, str] | None = None) -> tuple[bool, list[str]]:
        """Re-read the config file. A bad file is refused and the running config kept."""
        if self.config.source is None:
            return False, ["the running config was not loaded from a file"]
        try:
            config = load_config(self.config.source, os.environ if env is None else env)
        except ConfigError as exc:
            self.stats.config_reload_ok = False
            log.error("config reload refused; keeping the running config",
                      extra={"problems": exc.problems})
            return False, exc.problems
        ignored = self.apply(config)
        self.stats.config_reload_ok = True
        if ignored:
            log.warning("config reloaded; these settings need a restart",
                        extra={"ignored": ignored})
        else:
            log.info("config reloaded", extra={"budgets": len(config.budgets)})
        return True, [f"{k}: changed, needs a restart" for k in ignored]


def _known(config: Config) -> dict[str, frozenset[str]]:
    return {"department": config.known_departments, "project": config.known_projects}


def _limits(config: Config) -> IngestLimits:
    return IngestLimits(max_batch_events=config.ingest.max_batch_events,
                        max_future_seconds=config.ingest.max_future_seconds,
                        max_value_length=config.labels.max_value_length)
