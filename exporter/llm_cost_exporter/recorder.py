"""The one pipeline every usage source goes through: attribute, price, label, commit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llm_cost_exporter.budget_guard import BudgetGuard
from llm_cost_exporter.commit_pipe import PipeCommitQueue
from llm_cost_exporter.commit_queue import CommitQueue
from llm_cost_exporter.events import PricedEvent, UsageEvent
from llm_cost_exporter.labels import LabelGuard, LabelTicket
from llm_cost_exporter.ledger import BatchKey, BatchResult
from llm_cost_exporter.pricer import Pricer


class Prepared(list[PricedEvent]):
    """Priced, labelled events of one batch, with the label values their labelling
    reserved: settled by Recorder.commit once the commit's outcome is known."""

    ticket: LabelTicket


class Recorder:
    def __init__(self, pricer: Pricer, guard: LabelGuard, commits: CommitQueue | PipeCommitQueue,
                 budgets: BudgetGuard | None = None) -> None:
        self.pricer = pricer
        self.guard = guard
        self.commits = commits
        self.budgets = budgets

    def prepare(self, events: Sequence[UsageEvent]) -> Prepared:
        """Price and label; commit() the result (it settles the label reservations)."""
        out = Prepared()
        out.ticket = ticket = LabelTicket()
        labels_for, price = self.guard.labels_for, self.pricer.price
        for position, event in enumerate(events):
            quote = price(event)
            out.append(PricedEvent(event=event, labels=labels_for(event, ticket, position),
                                   cost=quote.cost, priced=quote.priced,
                                   price_source=quote.source))
        return out

    async def record(self, events: Sequence[UsageEvent], key: BatchKey | None = None
                     ) -> BatchResult:
        return await self.commit(self.prepare(events), key)

    async def commit(self, priced: Prepared, key: BatchKey | None = None) -> BatchResult:
        """Commit events already prepared (the proxy reads their labels first)."""
        try:
            result = await self.commits.record(priced, key)
        except asyncio.CancelledError:
            # The caller left; the queued batch is most likely committed anyway: keep its
            # values (at worst a slot is taken by a value that never arrived).
            self.guard.settle(priced.ticket, range(len(priced)))
            raise
        except BaseException:
            self.guard.settle(priced.ticket, ())  # nothing written: take no slot
            raise
        self.guard.settle(priced.ticket, result.written)
        self._committed(priced, result)
        return result


    def _committed(self, priced: list[PricedEvent], result: BatchResult) -> None:
        if self.budgets is not None and self.budgets.active:
            self.budgets.add([priced[i] for i in result.written])
