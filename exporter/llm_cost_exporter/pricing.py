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
        return tokens.output == 0 or self.rates_for(tokens).output is not None

    def cost(self, tokens: TokenCounts) -> Cost:
        r = self.rates_for(tokens)
        output = r.output if r.output is not None else Decimal(0)
        cache_read = r.input if r.cache_read is None else r.cache_read
        write_5m = r.input if r.cache_write is None else r.cache_write
        write_1h = write_5m if r.cache_write_1h is None else r.cache_write_1h
        reasoning = output if r.reasoning is None else r.reasoning
        visible_output = tokens.output - tokens.reasoning
        return Cost(
            input=tokens.input * r.input / MILLION,
            cache_read=tokens.cache_read * cache_read / MILLION,
            cache_write=((tokens.cache_write - tokens.cache_write_1h) * write_5m
                         + tokens.cache_write_1h * write_1h) / MILLION,
            output=(visible_output * output + tokens.reasoning * reasoning) / MILLION
            + r.per_request,
        )
