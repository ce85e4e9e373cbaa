"""The one event model every usage source (ingest, proxy, reporter) is turned into.

The classes are frozen msgspec Structs rather than frozen dataclasses: an ingested event
builds six of them, and a frozen dataclass pays an object.__setattr__ per field (1.27 us
for a six-field object on the build machine, against 0.07 us for a Struct). `gc=False`:
they hold only atoms and each other, never a cycle, so the cyclic collector can skip them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from msgspec import Struct

OUTCOMES = ("success", "error", "client_closed")
TOKEN_TYPES = ("input", "cache_read", "cache_write", "output")


class TokenCounts(Struct, frozen=True, gc=False, array_like=True):
    """Disjoint billing buckets. `reasoning` is a subset of `output`, never priced twice.

    `cache_write_1h` is the part of cache writes stored for one hour (Anthropic prices it
    higher); the rest of `cache_write` is the 5-minute kind.
    """

    input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0
    cache_write_1h: int = 0

    def __post_init__(self) -> None:
        values = (i, cr, cw, o, r, w1) = (self.input, self.cache_read, self.cache_write,
                                         self.output, self.reasoning, self.cache_write_1h)
        # One flat test on the hot path (no generator); the field is looked for on failure.
        if not (type(i) is int and type(cr) is int and type(cw) is int and type(o) is int
                and type(r) is int and type(w1) is int
                and i >= 0 and cr >= 0 and cw >= 0 and o >= 0 and r >= 0 and w1 >= 0):
            for name, value in zip(("input", "cache_read", "cache_write", "output",
                                    "reasoning", "cache_write_1h"), values, strict=True):
                if type(value) is not int or value < 0:
                    raise ValueError(f"{name}: must be a non-negative integer")
        if self.reasoning > self.output:
            raise ValueError("reasoning: must not exceed output (it is a subset of output)")
        if self.cache_write_1h > self.cache_write:
            raise ValueError("cache_write_1h: must not exceed cache_write")

    @property
    def prompt_total(self) -> int:
        """Every input-side token, cached or not: what long-context tiers are judged on."""
        return self.input + self.cache_read + self.cache_write

    @property
    def billed_total(self) -> int:
        return self.prompt_total + self.output

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            input=self.input + other.input,
            cache_read=self.cache_read + other.cache_read,
            cache_write=self.cache_write + other.cache_write,
            output=self.output + other.output,
            reasoning=self.reasoning + other.reasoning,
            cache_write_1h=self.cache_write_1h + other.cache_write_1h,
        )


class Attribution(Struct, frozen=True, gc=False, array_like=True):
    department: str
    project: str
    user: str | None = None


class UsageEvent(Struct, frozen=True, gc=False, array_like=True):
    """One LLM call, whatever way it reached us. Timestamps are aware UTC datetimes."""

    attribution: Attribution
    provider: str
    model: str
    tokens: TokenCounts
    timestamp: datetime
    outcome: str = "success"
    latency_seconds: float | None = None
    request_id: str | None = None
    source: str = "ingest"
    # Tokens estimated from text because the provider reported no usage (proxy streams only).
    estimated: bool = False

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome: must be one of {', '.join(OUTCOMES)}")
        if self.timestamp.tzinfo is None:
            raise ValueError("timestamp: must be timezone-aware")


class Cost(Struct, frozen=True, gc=False):
    """Cost of one event in USD, per bucket, exact."""

    input: Decimal = Decimal(0)
    cache_read: Decimal = Decimal(0)
    cache_write: Decimal = Decimal(0)
    output: Decimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        return self.input + self.cache_read + self.cache_write + self.output


class SeriesLabels(Struct, frozen=True, gc=False, array_like=True):
    """Label values as exported: capped and bounded, unlike the raw attribution."""

    department: str
    project: str
    provider: str
    model: str


class PricedEvent(Struct, frozen=True, gc=False, array_like=True):
    event: UsageEvent
    labels: SeriesLabels
    # The call's total cost in USD, exact (Cost.total of its buckets): all that ledgers and
    # budgets use. One Decimal, not the four buckets: the writer process decodes each event
    # it is sent (see ledger/sqlite_writer.py), and a Decimal is the costliest value to decode.
    cost: Decimal = Decimal(0)
    priced: bool = True
    # Where the price came from ("pricing.overrides: gpt-4o", "genai-prices 0.2.3: ..."):
    # kept in the ledger so a bill can be explained later.
    price_source: str = ""
