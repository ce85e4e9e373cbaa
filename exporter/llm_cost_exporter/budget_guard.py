"""Budget enforcement state for the proxy: is this scope over its daily or monthly limit?

Spend is read from the ledger every `refresh_seconds` (and at each period boundary), and this
process's own commits are added as they happen, so a scope is blocked by the request after
the one that crossed its limit. Other replicas' spend arrives with the next refresh: that
interval bounds how far several replicas together can overshoot (each replica can let
through, after the limit is crossed, the calls the *other* replicas commit within one refresh
interval, plus calls already in flight).

With a shared ledger (PostgreSQL) a refresh is a network round trip: the periodic one runs
in a background thread while checks go on with the last known spend, so the event loop never
waits on the database. If the ledger cannot answer, the last known spend stays in force and
a new period starts at 0: enforcement fails open rather than failing every proxied call.
"""

from __future__ import annotations

import logging
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
from llm_cost_exporter.ledger.base import LedgerUnavailable

log = logging.getLogger(__name__)


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
                 refresh_seconds: float = 5.0, background: bool = False) -> None:
        self._budgets = tuple(b for b in budgets if b.enforce)
        self._ledger = ledger
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._background = background
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._refreshing = False
        self._windows: dict[str, list[_Window]] = {}
        self._next_boundary: datetime | None = None
        self._refreshed_at = -math.inf
        # This process's commits counted while a refresh reads the ledger: re-applied to the
        # new windows (a commit the read already saw is then counted twice until the next
        # refresh: conservative, never an undercount).
        self._since: list[PricedEvent] | None = None

    @property
    def active(self) -> bool:
        return bool(self._budgets)

    def refresh(self) -> None:
        with self._refresh_lock:
            self._refresh()

    def _refresh(self) -> None:
        now = self._clock.now()
        with self._lock:
            self._since = []
        try:
            statuses = budget_statuses(self._budgets, self._ledger, now)
        except LedgerUnavailable as exc:
            log.warning("budget spend not refreshed; enforcing the last known spend",
                        extra={"error": str(exc)})
            with self._lock:
                self._since = None
                self._refreshed_at = time.monotonic()  # retry after the interval
                if self._next_boundary is None or now < self._next_boundary:
                    return
            statuses = budget_statuses(self._budgets, _NoSpend(), now)  # a new period
        windows: dict[str, list[_Window]] = {}
        for s in statuses:
            windows.setdefault(s.department, []).append(_Window(
                s.department, s.project, s.period, s.limit, s.spend, s.period_start,
                s.period_end))
        with self._lock:
            self._windows = windows
            since, self._since = self._since or [], None
            self._add_locked(since)
            ends = [w.end for ws in windows.values() for w in ws]
            self._next_boundary = min(ends) if ends else None
            self._refreshed_at = time.monotonic()

    def _refresh_soon(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="budget-refresh", daemon=True).start()

    def check(self, department: str, project: str) -> Block | None:
        """The first enforced budget of this scope that is spent, or None."""
        if not self._budgets:
            return None
        now = self._clock.now()
        stale = time.monotonic() - self._refreshed_at > self._refresh_seconds
        if self._refreshed_at == -math.inf or (self._next_boundary is not None
                                               and now >= self._next_boundary):
            self.refresh()  # nothing to enforce with yet, or a new period: wait for it
        elif stale and self._background:
            self._refresh_soon()
        elif stale:
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
            if self._since is not None:
                self._since.extend(events)
            self._add_locked(events)

    def _add_locked(self, events: Sequence[PricedEvent]) -> None:
        for priced in events:
            cost = priced.cost
            if not cost:
                continue
            ts = priced.event.timestamp
            for w in self._windows.get(priced.labels.department, ()):
                if w.project in (DEPARTMENT_WIDE, priced.labels.project) and \
                        w.start <= ts < w.end:
                    w.spend += cost


class _NoSpend:
    """Spend source of a period that just began while the ledger is away."""

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal:
        return Decimal(0)
