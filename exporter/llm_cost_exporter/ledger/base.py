"""The Ledger interface and the running-total types every backend keeps."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol

from llm_cost_exporter.events import PricedEvent

# Upper bounds (seconds) of the request-duration histogram: LLM calls take from a tenth of a
# second (small embeddings) to minutes (long reasoning).
LATENCY_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                                      120.0, 300.0)


class LedgerUnavailable(RuntimeError):
    """The ledger cannot take writes (read-only file, disk full, database gone)."""


class LedgerOutcomeUnknown(LedgerUnavailable):
    """The commit was sent but its answer never came (the writer process died after it got
    the batch): the events may or may not be in the ledger. A retry with the same
    request_ids or Idempotency-Key is counted once either way."""


class LedgerRejected(ValueError):
    """A batch the ledger cannot store as it is (a value out of range): nothing of it was
    written, and retrying it unchanged will not help. `position` is the event's index in
    its batch when the ledger knows which one."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class ValueOutOfRange(ValueError):
    """Raised by a ledger while writing one event of a batch; becomes LedgerRejected."""

    def __init__(self, position: int, what: str) -> None:
        super().__init__(what)
        self.position = position


class IdempotencyConflict(LedgerRejected):
    """An Idempotency-Key already used for a different body: nothing of this batch was
    written (the first body's events stay as they were)."""


@dataclass(frozen=True, slots=True)
class BatchKey:
    """A client's Idempotency-Key for one ingest batch, and a digest of the exact body it
    came with: the same key with the same body is a retry, with another body a mistake."""

    key: str
    digest: bytes


def stored_key_result(key: BatchKey, digest: bytes, accepted: int, duplicates: int
                      ) -> BatchResult | IdempotencyConflict:
    """What a batch sent again under an already recorded key gets: a replay of the first
    answer (same body) or a conflict (another body)."""
    if bytes(digest) != key.digest:
        # Never the key itself in the message: it is the client's, and may be logged.
        return IdempotencyConflict("Idempotency-Key was already used for a different body")
    return BatchResult(accepted, duplicates, (), replayed=True)


class SeriesKey(NamedTuple):
    department: str
    project: str
    provider: str
    model: str
    outcome: str


@dataclass(slots=True)
class SeriesTotals:
    requests: int = 0
    input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0
    unpriced: int = 0
    cost: Decimal = Decimal(0)
    estimated: int = 0

    def add(self, other: SeriesTotals) -> None:
        self.requests += other.requests
        self.input += other.input
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write
        self.output += other.output
        self.reasoning += other.reasoning
        self.unpriced += other.unpriced
        self.cost += other.cost
        self.estimated += other.estimated

    def copy(self) -> SeriesTotals:
        return SeriesTotals(self.requests, self.input, self.cache_read, self.cache_write,
                            self.output, self.reasoning, self.unpriced, self.cost,
                            self.estimated)


@dataclass(slots=True)
class LatencyTotals:
    # Non-cumulative counts per LATENCY_BUCKETS bound, plus one for +Inf.
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def add(self, other: LatencyTotals) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.count += other.count

    def copy(self) -> LatencyTotals:
        return LatencyTotals(list(self.counts), self.total, self.count)


@dataclass(slots=True)
class Totals:
    """Committed running totals: what /metrics shows. Never includes uncommitted work."""

    series: dict[SeriesKey, SeriesTotals] = field(default_factory=dict)
    latency: dict[tuple[str, str], LatencyTotals] = field(default_factory=dict)


def label_values(keys: Iterable[SeriesKey]) -> dict[str, set[str]]:
    """The values each label has in the committed totals (what the label guard starts with)."""
    keys = list(keys)
    return {
        "department": {k.department for k in keys}, "project": {k.project for k in keys},
        "provider": {k.provider for k in keys}, "model": {k.model for k in keys},
    }


@dataclass(frozen=True, slots=True)
class BatchResult:
    accepted: int
    duplicates: int
    # Positions (in the batch) of the events that were new and written.
    written: tuple[int, ...] = field(default=(), compare=False)
    # True when the batch's Idempotency-Key was already recorded with the same body: nothing
    # was written now, and accepted/duplicates are those of the first time.
    replayed: bool = False


class Ledger(Protocol):
    def record(self, batches: Sequence[Sequence[PricedEvent]],
               keys: Sequence[BatchKey | None] | None = None) -> list[BatchResult | Exception]:
        """Write batches in one commit; each batch is all-or-nothing, results in order.

        `keys` (one per batch, or None) are Idempotency-Keys: a key already recorded with the
        same digest (before, or by an earlier batch of this commit) makes its batch a replay
        (nothing written, the first result returned with replayed=True); with another digest
        the batch's result is IdempotencyConflict. A new key is stored with its batch's
        result in the same transaction as the batch's events.

        Raises LedgerUnavailable when nothing could be committed.
        """
        ...

    def lookup_key(self, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
        """The answer for a key already committed (see record), or None. A read only: lets
        the API answer a retry before parsing, pricing or labelling its body again; record()
        still decides inside its transaction."""
        ...

    def totals(self) -> Totals:
        """A consistent copy of the committed running totals."""
        ...

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal:
        """USD spent by a department (project None = all its projects) in [start, end)."""
        ...

    def check(self) -> None:
        """Raise LedgerUnavailable unless the ledger can be read and written."""
        ...

    def close(self) -> None: ...
