"""Adapter over the bundled `genai-prices` database (offline; never auto-updated here)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from importlib.metadata import version
from typing import Any

from llm_cost_exporter.pricing import PriceSet, Rates

_BUCKET_KEYS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "reasoning": "output_reasoning_mtok",
}


class GenAIPricesDB:
    """Looks models up in genai-prices' bundled snapshot and turns its prices into PriceSets."""

    def __init__(self) -> None:
        # Imported here so that importing the package stays cheap and side-effect free.
        from genai_prices import data_snapshot

        self._snapshot = data_snapshot.get_snapshot()
        self._converted: dict[int, tuple[Any, PriceSet]] = {}
        self.version = version("genai-prices")

    def lookup(self, provider: str | None, model: str, at: datetime) -> PriceSet | None:
        try:
            found_provider, info = self._snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            return None
        model_price = info.get_prices(at)
        cached = self._converted.get(id(model_price))
        if cached is not None and cached[0] is model_price:
            return cached[1]
        price_set = self._convert(model_price, f"genai-prices {self.version}: "
                                               f"{found_provider.id}/{info.id}", info.id)
        # Keep a reference to model_price so its id() cannot be reused by another object.
        self._converted[id(model_price)] = (model_price, price_set)
        return price_set

    @staticmethod
    def _convert(model_price: Any, source: str, model_id: str) -> PriceSet | None:
        from genai_prices.types import TieredPrices

        raw = {bucket: getattr(model_price, key, None) for bucket, key in _BUCKET_KEYS.items()}
        if raw["input"] is None:
            # Priced by characters, audio seconds or similar: not a token price we can use.
            return None
        thresholds = sorted({tier.start for value in raw.values()
                             if isinstance(value, TieredPrices) for tier in value.tiers})

        def rate_at(value: Any, above: int | None) -> Decimal | None:
            if value is None or not isinstance(value, TieredPrices):
                return value
            chosen = value.base
            for tier in value.tiers:
                if above is not None and above >= tier.start:
                    chosen = tier.price
            return chosen

        def rates(above: int | None) -> Rates:
            values = {bucket: rate_at(value, above) for bucket, value in raw.items()}
            per_k = getattr(model_price, "requests_kcount", None)
            per_request = (per_k / 1000) if isinstance(per_k, Decimal) else Decimal(0)
            return Rates(per_request=per_request, **values)  # type: ignore[arg-type]

        return PriceSet(
            base=rates(None),
            tiers=tuple((t, rates(t)) for t in thresholds),
            source=source,
            model=model_id,
        )
