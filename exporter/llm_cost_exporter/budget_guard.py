"""Budget enforcement state for the proxy: is this scope over its daily or monthly limit?

Spend is read from the ledger every `refresh_seconds` (and at each period boundary), and this
process's own commits are added as they happen, so a scope is blocked by the request after
the one that crossed its limit. Other replicas' spend arrives with the next refresh: that
interval bounds how far several replicas together can overshoot.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from llm_cost_exporter.budgets import SpendSource, budget_statuses
from llm_cost_exporter.clock import Clock
from llm_cost_exporter.config import DEPARTMENT_WIDE, Budget
from llm_cost_exporter.events import PricedEvent


@dataclass(frozen=True, slots=True)
class Block:
    department: str
    project: str
    period: str
    limit: Decimal
    spend: Decimal
    period_end: datetime
    retry_after_seconds: int


@dataclass(slots=True)
class _Window:
    department: str
    project: str
    period: str
    limit: Decimal
    spend: Decimal
    start: datetime
    end: datetime


class BudgetGuard:
    def __init__(self, budgets: Sequence[Budget], ledger: SpendSource, clock: Clock,
                 refresh_seconds: float = 5.0) -> None:
        self._budgets = tuple(b for b in budgets if b.enforce)
        self._ledger = ledger
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._windows: dict[str, list[_Window]] = {}
        self._next_boundary: datetime | None = None
        self._refreshed_at = -math.inf

    @property
    def active(self) -> bool:
        return bool(self._budgets)

    def refresh(self) -> None:
        now = self._clock.now()
        windows: dict[str, list[_Window]] = {}
        for s in budget_statuses(self._budgets, self._ledger, now):
            windows.setdefault(s.department, []).append(_Window(
                s.department, s.project, s.period, s.limit, s.spend, s.period_start,
                s.period_end))
        with self._lock:
            self._windows = windows
            ends = [w.end for ws in windows.values() for w in ws]
            self._next_boundary = min(ends) if ends else None
            self._refreshed_at = time.monotonic()

    def check(self, department: str, project: str) -> Block | None:
        """The first enforced budget of this scope that is spent, or None."""
        if not self._budgets:
            return None
        now = self._clock.now()
        stale = time.monotonic() - self._refreshed_at > self._refresh_seconds
        if stale or (self._next_boundary is not None and now >= self._next_boundary):
            self.refresh()
        with self._lock:
            for w in self._windows.get(department, ()):
                if w.project not in (DEPARTMENT_WIDE, project) or w.spend < w.limit:
                    continue
                wait = max(1, math.ceil((w.end - now).total_seconds()))
                return Block(w.department, w.project, w.period, w.limit, w.spend, w.end, wait)
        return None

    def add(self, events: Sequence[PricedEvent]) -> None:
        """Count this process's committed events at once, without waiting for a refresh."""
        if not self._budgets:
            return
        with self._lock:
            for priced in events:
                cost = priced.cost.total
                if not cost:
                    continue
                ts = priced.event.timestamp
                for w in self._windows.get(priced.labels.department, ()):
                    if w.project in (DEPARTMENT_WIDE, priced.labels.project) and \
                            w.start <= ts < w.end:
                        w.spend += cost
