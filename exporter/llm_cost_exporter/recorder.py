"""The one pipeline every usage source goes through: attribute, price, label, commit."""

from __future__ import annotations

from collections.abc import Sequence

from llm_cost_exporter.budget_guard import BudgetGuard
from llm_cost_exporter.commit_queue import CommitQueue
from llm_cost_exporter.events import PricedEvent, UsageEvent
from llm_cost_exporter.labels import LabelGuard
from llm_cost_exporter.ledger import BatchKey, BatchResult
from llm_cost_exporter.pricer import Pricer


class Recorder:
    def __init__(self, pricer: Pricer, guard: LabelGuard, commits: CommitQueue,
                 budgets: BudgetGuard | None = None) -> None:
        self.pricer = pricer
        self.guard = guard
        self.commits = commits
        self.budgets = budgets

    def prepare(self, events: Sequence[UsageEvent]) -> list[PricedEvent]:
        out = []
        for event in events:
            quote = self.pricer.price(event)
            out.append(PricedEvent(event=event, labels=self.guard.labels_for(event),
                                   cost=quote.cost, priced=quote.priced,
                                   price_source=quote.source))
        return out

    async def record(self, events: Sequence[UsageEvent], key: BatchKey | None = None
                     ) -> BatchResult:
        return await self.commit(self.prepare(events), key)

    async def commit(self, priced: list[PricedEvent], key: BatchKey | None = None
                     ) -> BatchResult:
        """Commit events already prepared (the proxy reads their labels first)."""
        result = await self.commits.record(priced, key)
        self._committed(priced, result)
        return result


    def _committed(self, priced: list[PricedEvent], result: BatchResult) -> None:
        if self.budgets is not None and self.budgets.active:
            self.budgets.add([priced[i] for i in result.written])
