"""Calendar budget periods in a budget's own time zone, and the budget state views."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol
from zoneinfo import ZoneInfo

from llm_cost_exporter.config import DEPARTMENT_WIDE, Budget

PERIODS = ("daily", "monthly")


def period_bounds(now: datetime, zone: ZoneInfo, period: str) -> tuple[datetime, datetime]:
    """[start, end) of the calendar day or month containing `now`, in `zone`, as UTC.

    Local midnights are built with the zone's rules, so a 23- or 25-hour DST day is exactly
    as long as it is on the wall clock, and a midnight skipped by DST starts the day at the
    transition instant.
    """
    local = now.astimezone(zone)
    if period == "daily":
        start = datetime(local.year, local.month, local.day, tzinfo=zone)
        nxt = (start.replace(tzinfo=None) + timedelta(days=1)).date()
        end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    elif period == "monthly":
        start = datetime(local.year, local.month, 1, tzinfo=zone)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        end = datetime(year, month, 1, tzinfo=zone)
    else:
        raise ValueError(f"unknown period {period!r}")
    return start.astimezone(UTC), end.astimezone(UTC)


class SpendSource(Protocol):
    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal: ...


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    department: str
    project: str
    period: str
    limit: Decimal
    spend: Decimal
    warning_ratio: Decimal
    period_start: datetime
    period_end: datetime
    enforce: bool

    @property
    def exceeded(self) -> bool:
        return self.spend >= self.limit


def budget_statuses(budgets: tuple[Budget, ...], ledger: SpendSource,
                    now: datetime) -> list[BudgetStatus]:
    """Spend of every configured budget scope in its current period, read from the ledger."""
    out: list[BudgetStatus] = []
    for budget in budgets:
        project = None if budget.project == DEPARTMENT_WIDE else budget.project
        for period, limit in budget.limits().items():
            start, end = period_bounds(now, budget.zone, period)
            out.append(BudgetStatus(
                department=budget.department, project=budget.project, period=period,
                limit=limit, spend=ledger.spend(budget.department, project, start, end),
                warning_ratio=budget.warning_ratio, period_start=start, period_end=end,
                enforce=budget.enforce,
            ))
    return out
