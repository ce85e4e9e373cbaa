"""Calendar periods in the budget's zone (month end, New Year, DST) and rollover."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from llm_cost_exporter.budgets import budget_statuses, period_bounds
from llm_cost_exporter.clock import FixedClock
from llm_cost_exporter.config import Budget
from llm_cost_exporter.events import (
    Attribution,
    PricedEvent,
    SeriesLabels,
    TokenCounts,
    UsageEvent,
)
from llm_cost_exporter.ledger.sqlite import SQLiteLedger

NY = ZoneInfo("America/New_York")
HCM = ZoneInfo("Asia/Ho_Chi_Minh")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("now", "zone", "period", "start", "end"), [
    # Last second of January, UTC.
    (utc(2026, 1, 31, 23, 59, 59), "UTC", "monthly", utc(2026, 1, 1), utc(2026, 2, 1)),
    (utc(2026, 1, 31, 23, 59, 59), "UTC", "daily", utc(2026, 1, 31), utc(2026, 2, 1)),
    # February 2028 is a leap month.
    (utc(2028, 2, 29, 12), "UTC", "monthly", utc(2028, 2, 1), utc(2028, 3, 1)),
    # New Year in UTC: 23:30 on Dec 31 is still the old year.
    (utc(2026, 12, 31, 23, 30), "UTC", "monthly", utc(2026, 12, 1), utc(2027, 1, 1)),
    # ...but it is already 06:30 on Jan 1 in Ho Chi Minh City (UTC+7).
    (utc(2026, 12, 31, 23, 30), "Asia/Ho_Chi_Minh", "monthly",
     utc(2026, 12, 31, 17), utc(2027, 1, 31, 17)),
    (utc(2026, 12, 31, 23, 30), "Asia/Ho_Chi_Minh", "daily",
     utc(2026, 12, 31, 17), utc(2027, 1, 1, 17)),
    # 16:59Z on Dec 31 is 23:59 local: still December there.
    (utc(2026, 12, 31, 16, 59), "Asia/Ho_Chi_Minh", "monthly",
     utc(2026, 11, 30, 17), utc(2026, 12, 31, 17)),
    # New York DST starts 2026-03-08 02:00 EST -> 03:00 EDT: a 23-hour day.
    (utc(2026, 3, 8, 12), "America/New_York", "daily", utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)),
    # DST ends 2026-11-01 02:00 EDT -> 01:00 EST: a 25-hour day.
    (utc(2026, 11, 1, 12), "America/New_York", "daily", utc(2026, 11, 1, 4), utc(2026, 11, 2, 5)),
    # March in New York starts in EST and ends in EDT.
    (utc(2026, 3, 20), "America/New_York", "monthly", utc(2026, 3, 1, 5), utc(2026, 4, 1, 4)),
    # 03:30Z on Nov 1 is 23:30 EDT on Oct 31 in New York: still October.
    (utc(2026, 11, 1, 3, 30), "America/New_York", "monthly", utc(2026, 10, 1, 4),
     utc(2026, 11, 1, 4)),
])
def test_period_bounds(now: datetime, zone: str, period: str, start: datetime,
                       end: datetime) -> None:
    assert period_bounds(now, ZoneInfo(zone), period) == (start, end)


def test_dst_days_have_wall_clock_length() -> None:
    start, end = period_bounds(utc(2026, 3, 8, 12), NY, "daily")
    assert end - start == timedelta(hours=23)
    start, end = period_bounds(utc(2026, 11, 1, 12), NY, "daily")
    assert end - start == timedelta(hours=25)


def _event(ts: datetime, cost: str, department: str = "eng", project: str = "app",
           request_id: str | None = None) -> PricedEvent:
    ev = UsageEvent(Attribution(department, project), "openai", "gpt-4o",
                    TokenCounts(input=1), ts, request_id=request_id)
    return PricedEvent(event=ev, labels=SeriesLabels(department, project, "openai", "gpt-4o"),
                       cost=D(cost))


def _budget(project: str = "app", zone: str = "UTC") -> Budget:
    return Budget(department="eng", project=project, daily_usd=D(10), monthly_usd=D(100),
                  warning_ratio=D("0.8"), timezone=zone)


def _spend(statuses: list, period: str) -> D:
    return next(s.spend for s in statuses if s.period == period)


def test_rollover_without_restart_and_restore_from_ledger(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    clock = FixedClock(utc(2026, 1, 31, 23, 50))
    ledger.record([[_event(utc(2026, 1, 31, 23, 40), "1.25"),
                    _event(utc(2026, 1, 30, 10, 0), "2.5"),
                    _event(utc(2026, 1, 31, 23, 45), "0.75", project="other-app")]])
    budgets = (_budget(), _budget(project="*"))
    statuses = budget_statuses(budgets[:1], ledger, clock.now())
    # Day: only the 23:40 event (1.25); month: 1.25 + 2.5 = 3.75.
    assert (_spend(statuses, "daily"), _spend(statuses, "monthly")) == (D("1.25"), D("3.75"))
    # The department-wide budget also sees other-app: 3.75 + 0.75 = 4.5 this month.
    assert _spend(budget_statuses(budgets[1:], ledger, clock.now()), "monthly") == D("4.5")
    clock.set(utc(2026, 2, 1, 0, 0, 1))  # one second past midnight: both periods roll over
    statuses = budget_statuses(budgets[:1], ledger, clock.now())
    assert (_spend(statuses, "daily"), _spend(statuses, "monthly")) == (D(0), D(0))
    ledger.record([[_event(utc(2026, 2, 1, 0, 0, 1), "0.5")]])
    ledger.close()
    reopened = SQLiteLedger(tmp_path / "l.db")
    statuses = budget_statuses(budgets[:1], reopened, clock.now())
    assert (_spend(statuses, "daily"), _spend(statuses, "monthly")) == (D("0.5"), D("0.5"))
    end = next(s.period_end for s in statuses if s.period == "monthly")
    assert end == utc(2026, 3, 1)


def test_budget_in_ho_chi_minh_counts_by_local_day(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    # 16:50Z is 23:50 local on the 14th; 17:10Z is 00:10 local on the 15th.
    ledger.record([[_event(utc(2026, 3, 14, 16, 50), "1"), _event(utc(2026, 3, 14, 17, 10), "2")]])
    statuses = budget_statuses((_budget(zone="Asia/Ho_Chi_Minh"),), ledger,
                               utc(2026, 3, 14, 18, 0))
    assert _spend(statuses, "daily") == D(2)
    assert _spend(statuses, "monthly") == D(3)
