"""Enforcement on a shared (networked) ledger: refreshed off the caller's thread, and failing
open on the last known spend when the ledger cannot answer."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal as D

from llm_cost_exporter.budget_guard import BudgetGuard
from llm_cost_exporter.clock import FixedClock
from llm_cost_exporter.config import Budget
from llm_cost_exporter.ledger import LedgerUnavailable

from conftest import wait_until

BUDGET = Budget(department="eng", project="*", daily_usd=D(10), monthly_usd=None,
                warning_ratio=D("0.8"), timezone="UTC", enforce=True)


class Spend:
    """A SpendSource whose answer, failure and calling thread the test controls."""

    def __init__(self, value: str) -> None:
        self.value = D(value)
        self.down = False
        self.threads: list[str] = []
        self.gate = threading.Event()  # holds background reads until the test opens it
        self.gate.set()

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> D:
        self.threads.append(threading.current_thread().name)
        if threading.current_thread().name != "MainThread":
            self.gate.wait(10)
        if self.down:
            raise LedgerUnavailable("database gone")
        return self.value


def test_a_stale_refresh_runs_in_the_background() -> None:
    ledger = Spend("4")
    guard = BudgetGuard([BUDGET], ledger, FixedClock(datetime(2026, 3, 14, tzinfo=UTC)),
                        refresh_seconds=0.0, background=True)
    assert guard.check("eng", "app") is None  # first check: read at once, on this thread
    assert ledger.threads == ["MainThread"]
    ledger.value = D("12")  # another replica spent meanwhile
    ledger.gate.clear()  # the database is slow to answer
    # Stale: this check starts a refresh in the background and answers from what it knows,
    # without waiting for the database.
    assert guard.check("eng", "app") is None
    wait_until(lambda: "budget-refresh" in ledger.threads, 5, "the background refresh")
    assert guard.check("eng", "app") is None  # one refresh at a time, still the old spend
    ledger.gate.set()
    wait_until(lambda: guard.check("eng", "app") is not None, 5, "the refresh to land")
    assert "MainThread" not in ledger.threads[1:]


def test_an_unreachable_ledger_keeps_the_last_known_spend() -> None:
    ledger = Spend("12")
    clock = FixedClock(datetime(2026, 3, 14, 23, tzinfo=UTC))
    guard = BudgetGuard([BUDGET], ledger, clock, refresh_seconds=0.0)
    block = guard.check("eng", "app")
    assert block is not None and block.spend == D(12)
    ledger.down = True
    # The refresh fails: still blocked on $12, and no exception reaches the proxy.
    block = guard.check("eng", "app")
    assert block is not None and block.spend == D(12)
    # A new day while the ledger is away starts at 0 rather than blocking all day.
    clock.set(datetime(2026, 3, 15, 0, 0, 1, tzinfo=UTC))
    assert guard.check("eng", "app") is None


def test_nothing_known_and_ledger_down_fails_open() -> None:
    ledger = Spend("0")
    ledger.down = True
    guard = BudgetGuard([BUDGET], ledger, FixedClock(datetime(2026, 3, 14, tzinfo=UTC)))
    assert guard.check("eng", "app") is None
