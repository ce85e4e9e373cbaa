"""Resolve a (provider, model) to a price, and price usage events.

Resolution: the user's table first (exact, alias, without provider prefix, without date
suffix), then the bundled genai-prices database through the same name variants. The user's
table is searched through every variant before the database, so a negotiated price for
`gpt-4o` also applies to `gpt-4o-2024-08-06`. A model with no price is never guessed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from msgspec import Struct

from llm_cost_exporter.events import UsageEvent
from llm_cost_exporter.price_table import PriceTable
from llm_cost_exporter.pricing import PriceSet

log = logging.getLogger(__name__)

_DATE_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8})$")
_ZERO = Decimal(0)
# Database prices change at dated snapshots and, for some models, at a time of day on the
# hour or the half hour (genai-prices 0.2.3: DeepSeek's off-peak prices from 16:30 to 00:30
# UTC): a database answer is kept for the 15-minute span of the call.
SPAN_SECONDS = 900
_SPAN = timedelta(seconds=SPAN_SECONDS)
# The span of a price from the user's table: it never changes while running.
_ALWAYS = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
# Our provider names -> genai-prices provider ids where they differ.
_DB_PROVIDER = {"gemini": "google", "vertex": "google", "bedrock": "aws", "xai": "x-ai"}


class Quote(Struct, frozen=True, gc=False):
    # A Struct, not a NamedTuple: one is built per event (0.07 against 0.3 us).
    cost: Decimal  # the total, exact (Cost.total)
    priced: bool
    source: str


class PriceDB(Protocol):
    def lookup(self, provider: str | None, model: str, at: datetime) -> PriceSet | None: ...


def name_variants(model: str, aliases: dict[str, str]) -> Iterator[str]:
    """Exact name, then alias, then without provider prefix, then without date suffix;
    every form also through the alias table."""
    name = model.strip().lower()
    unprefixed = name.split("/", 1)[1] if "/" in name else name
    forms = (name, unprefixed, _DATE_SUFFIX.sub("", unprefixed))
    seen: set[str] = set()
    for form in forms:
        for variant in (form, aliases.get(form)):
            if variant and variant not in seen:
                seen.add(variant)
                yield variant


class Pricer:
    def __init__(self, table: PriceTable, db: PriceDB | None) -> None:
        self._table = table
        self._db = db
        # Database answers per name and 15-minute span (SPAN_SECONDS); table prices never
        # change while running.
        self._cache: dict[tuple[str, str, int], PriceSet | None] = {}
        # The last answer per name and the span it holds for ([start, end): the span it was
        # resolved for, or always for the user's table). Senders repeat a few names within
        # minutes: two datetime comparisons instead of a timestamp() and a 3-tuple key.
        self._recent: dict[tuple[str, str], tuple[datetime, datetime, PriceSet | None]] = {}
        self._warned: set[tuple[str, str]] = set()

    def resolve(self, provider: str, model: str, at: datetime) -> PriceSet | None:
        name = (provider, model)
        recent = self._recent.get(name)
        if recent is not None and recent[0] <= at < recent[1]:
            return recent[2]
        span = int(at.timestamp()) // SPAN_SECONDS
        key = (provider, model, span)
        try:
            price = self._cache[key]
        except KeyError:
            price, always = self._resolve_uncached(provider, model, at)
            if len(self._cache) > 50_000:  # bounded: old spans and one-off names age out
                self._cache.clear()
            if not always:
                self._cache[key] = price
        else:
            always = False
        if len(self._recent) >= 50_000:  # bounded, like the cache above
            self._recent.clear()
        if always:
            self._recent[name] = (*_ALWAYS, price)
        else:
            start = datetime.fromtimestamp(span * SPAN_SECONDS, UTC)
            # The last span before datetime.max has no end to compute: held to the end.
            end = start + _SPAN if start < _ALWAYS[1] - _SPAN else _ALWAYS[1]
            self._recent[name] = (start, end, price)
        return price

    def _resolve_uncached(self, provider: str, model: str, at: datetime
                          ) -> tuple[PriceSet | None, bool]:
        """The price, and whether it is the user's table's (the same at any time)."""
        prov = provider.lower()
        priced_as = self._table.provider_aliases.get(prov, prov)
        variants = list(name_variants(model, self._table.aliases))
        for variant in variants:
            for key in ((prov, variant), (priced_as, variant), (None, variant)):
                found = self._table.models.get(key)
                if found is not None:
                    return found, True
        if self._db is None:
            return None, False
        db_provider = _DB_PROVIDER.get(priced_as, priced_as)
        for variant in variants:
            found = self._db.lookup(db_provider, variant, at)
            if found is not None:
                return found, False
        return None, False

    def price(self, event: UsageEvent) -> Quote:
        tokens = event.tokens
        if not (tokens.input or tokens.cache_read or tokens.cache_write or tokens.output):
            # A failed call with no tokens costs nothing, whatever the model: not "unpriced".
            return Quote(_ZERO, True, "no tokens")
        price = self.resolve(event.provider, event.model, event.timestamp)
        rates = None
        if price is not None:
            rates = price.rates_for(tokens)
            if not rates.covers(tokens):
                rates = None  # e.g. output tokens on a model priced for input only
        if price is None or rates is None:
            key = (event.provider, event.model)
            # Bounded: distinct names from a misbehaving client must not grow memory or log.
            if key not in self._warned and len(self._warned) < 1000:
                self._warned.add(key)
                # Logged once per model: a loud line per request would drown the log.
                log.warning("no price for model; counted as unpriced with cost 0",
                            extra={"provider": event.provider, "model": event.model})
            return Quote(_ZERO, False, "")
        return Quote(rates.total_of(tokens), True, price.source)
