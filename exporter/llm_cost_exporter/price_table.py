"""The user's pricing.yaml: negotiated, reseller and self-hosted prices, plus aliases.

```yaml
models:                       # USD per 1M tokens
  - {model: gpt-4o, provider: openai, input: 2.25, cache_read: 1.125, output: 9}
  - {model: llama-3.1-70b-internal, input: 0.10, output: 0.10}
  - model: claude-sonnet-4-5
    input: 3
    cache_write: 3.75
    cache_write_1h: 6
    cache_read: 0.30
    output: 15
    tiers: [{above_input_tokens: 200000, input: 6, cache_write: 7.5, cache_write_1h: 12,
             cache_read: 0.6, output: 22.5}]
aliases: {prod-gpt4o: gpt-4o}          # model name as called -> priced name
provider_aliases: {my-gateway: openai} # price an OpenAI-compatible gateway as OpenAI
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from llm_cost_exporter.pricing import PriceSet, Rates
from llm_cost_exporter.validation import Problems

_RATE_KEYS = {"input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning",
              "per_request"}


@dataclass(frozen=True)
class PriceTable:
    # (provider or None, lower-cased model) -> prices; provider None applies to every provider.
    models: dict[tuple[str | None, str], PriceSet] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    provider_aliases: dict[str, str] = field(default_factory=dict)

    def merged_over(self, base: PriceTable) -> PriceTable:
        """This table's entries win over `base`'s."""
        return PriceTable(
            models={**base.models, **self.models},
            aliases={**base.aliases, **self.aliases},
            provider_aliases={**base.provider_aliases, **self.provider_aliases},
        )


def _rates(entry: Mapping[str, Any], path: str, problems: Problems) -> Rates | None:
    values = {key: problems.decimal(entry, key, path) for key in _RATE_KEYS}
    if values["input"] is None:
        if "input" not in entry:
            problems.add(f"{path}.input", "is required")
        return None
    per_request = values.pop("per_request") or Decimal(0)
    return Rates(per_request=per_request, **values)  # type: ignore[arg-type]


def parse_price_table(data: Any, origin: str, problems: Problems) -> PriceTable:
    root = problems.mapping(data, origin)
    problems.unknown_keys(root, {"models", "aliases", "provider_aliases"}, origin)
    models: dict[tuple[str | None, str], PriceSet] = {}
    entries = root.get("models") or []
    if not isinstance(entries, list):
        problems.add(f"{origin}.models", "must be a list")
        entries = []
    for i, raw in enumerate(entries):
        path = f"{origin}.models[{i}]"
        entry = problems.mapping(raw, path)
        problems.unknown_keys(entry, _RATE_KEYS | {"model", "provider", "tiers", "note"}, path)
        name = problems.string(entry, "model", path, required=True)
        provider = problems.string(entry, "provider", path)
        base = _rates(entry, path, problems)
        tiers: list[tuple[int, Rates]] = []
        for j, raw_tier in enumerate(entry.get("tiers") or []):
            tier_path = f"{path}.tiers[{j}]"
            tier = problems.mapping(raw_tier, tier_path)
            problems.unknown_keys(tier, _RATE_KEYS | {"above_input_tokens"}, tier_path)
            above = problems.integer(tier, "above_input_tokens", tier_path, default=-1, minimum=1)
            rates = _rates(tier, tier_path, problems)
            if rates is not None and above > 0:
                tiers.append((above, rates))
        if name is None or base is None:
            continue
        key = (provider.lower() if provider else None, name.lower())
        if key in models:
            problems.add(f"{path}.model", f"duplicate entry for {name!r}")
        models[key] = PriceSet(base=base, tiers=tuple(tiers), source=f"{origin}: {name}",
                               model=name)
    aliases = _string_map(root.get("aliases"), f"{origin}.aliases", problems)
    provider_aliases = _string_map(root.get("provider_aliases"), f"{origin}.provider_aliases",
                                   problems)
    return PriceTable(models=models, aliases=aliases, provider_aliases=provider_aliases)


def _string_map(value: Any, path: str, problems: Problems) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, target in problems.mapping(value, path).items():
        if not isinstance(key, str) or not isinstance(target, str) or not target:
            problems.add(f"{path}.{key}", "must map a name to a non-empty name")
            continue
        result[key.lower()] = target.lower()
    return result


def load_price_table(path: Path, problems: Problems, origin: str | None = None) -> PriceTable:
    label = origin or str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.add(label, f"cannot read: {exc.strerror}")
        return PriceTable()
    except yaml.YAMLError as exc:
        problems.add(label, f"invalid YAML: {exc}")
        return PriceTable()
    return parse_price_table(data, label, problems)


def bundled_table_path() -> Path:
    return Path(__file__).parent / "data" / "pricing.yaml"
