"""Prices (USD per 1M tokens) and the exact cost of one call's token buckets."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from llm_cost_exporter.events import Cost, TokenCounts

MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens for each bucket.

    A missing cache price means the provider bills those tokens as plain input (no discount);
    a missing 1-hour cache-write price falls back to the 5-minute one; a missing reasoning
    price means reasoning is billed as output. `per_request` is a flat fee per call.
    """

    input: Decimal
    # None for input-only models (embeddings): a call with output tokens is then unpriced.
    output: Decimal | None
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    reasoning: Decimal | None = None
    per_request: Decimal = Decimal(0)
    # What cost_of needs, worked out once (see _Terms).
    _terms: _Terms = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_terms", _Terms(self))

    def covers(self, tokens: TokenCounts) -> bool:
        """False for output tokens on a model priced for input only (embeddings)."""
        return tokens.output == 0 or self.output is not None

    def cost_of(self, tokens: TokenCounts) -> Cost:
        """The cost of these tokens at these rates: per bucket, (tokens x rate) / 1M."""
        return Cost(*self._buckets(tokens))

    def total_of(self, tokens: TokenCounts) -> Decimal:
        """cost_of(tokens).total, without building the Cost (the ingest hot path)."""
        input_, cache_read, cache_write, output = self._buckets(tokens)
        return input_ + cache_read + cache_write + output  # Cost.total's order

    def _buckets(self, tokens: TokenCounts) -> tuple[Decimal, Decimal, Decimal, Decimal]:
        """Input, cache read, cache write and output cost. A bucket with no tokens takes
        its value from _Terms: the same Decimal, digits and exponent, that the arithmetic
        gives for 0 tokens (test_pricing compares the two), at none of the cost. Most calls
        leave most buckets empty."""
        t = self._terms
        n_input, n_read, n_write, n_1h, n_output, n_reasoning = (
            tokens.input, tokens.cache_read, tokens.cache_write, tokens.cache_write_1h,
            tokens.output, tokens.reasoning)
        if n_write:
            cache_write = ((n_write - n_1h) * t.write_5m + n_1h * t.write_1h) / MILLION
        else:
            cache_write = t.no_cache_write
        visible = n_output - n_reasoning
        if n_reasoning:
            output = (visible * t.output + n_reasoning * t.reasoning) / MILLION + t.per_request
        elif visible:
            output = (visible * t.output + t.no_reasoning) / MILLION + t.per_request
        else:
            output = t.no_output
        return (n_input * t.input / MILLION if n_input else t.no_input,
                n_read * t.cache_read / MILLION if n_read else t.no_cache_read,
                cache_write, output)


class _Terms:
    """A Rates' prices with the fallbacks applied, and each bucket's cost for 0 tokens.

    0 tokens still cost a Decimal zero whose exponent comes from the rate (0 x 0.15 is
    0.00): kept exactly, so a stored cost reads the same digit for digit as it did when
    every bucket was computed.
    """

    __slots__ = (
        "cache_read",
        "input",
        "no_cache_read",
        "no_cache_write",
        "no_input",
        "no_output",
        "no_reasoning",
        "output",
        "per_request",
        "reasoning",
        "write_1h",
        "write_5m",
    )

    def __init__(self, r: Rates) -> None:
        self.input = r.input
        self.output = output = r.output if r.output is not None else Decimal(0)
        self.cache_read = r.input if r.cache_read is None else r.cache_read
        self.write_5m = write_5m = r.input if r.cache_write is None else r.cache_write
        self.write_1h = write_5m if r.cache_write_1h is None else r.cache_write_1h
        self.reasoning = output if r.reasoning is None else r.reasoning
        self.per_request = r.per_request
        self.no_input = 0 * self.input / MILLION
        self.no_cache_read = 0 * self.cache_read / MILLION
        self.no_cache_write = (0 * self.write_5m + 0 * self.write_1h) / MILLION
        self.no_reasoning = 0 * self.reasoning
        self.no_output = (0 * output + 0 * self.reasoning) / MILLION + r.per_request


@dataclass(frozen=True, slots=True)
class PriceSet:
    """Base rates plus long-context tiers.

    Tiers are cliffs, as providers bill them: once a request's input side (input + cache
    read + cache write) is above a tier's threshold, the WHOLE request uses that tier.
    """

    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = ""
    model: str = ""
    effective_model: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Tiers sorted once, so rates_for can stop at the first threshold not passed.
        object.__setattr__(self, "tiers", tuple(sorted(self.tiers, key=lambda t: t[0])))

    def rates_for(self, tokens: TokenCounts) -> Rates:
        if not self.tiers:
            return self.base
        chosen = self.base
        prompt = tokens.prompt_total
        for threshold, rates in self.tiers:
            if prompt <= threshold:
                break
            chosen = rates
        return chosen

    def covers(self, tokens: TokenCounts) -> bool:
        return self.rates_for(tokens).covers(tokens)

    def cost(self, tokens: TokenCounts) -> Cost:
        return self.rates_for(tokens).cost_of(tokens)
