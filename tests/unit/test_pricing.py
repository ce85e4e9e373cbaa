"""Exact costs of the example payloads, with the arithmetic by hand.

List prices are those of the pinned genai-prices 0.2.3 (USD per 1M tokens), as published by
the providers: o3 2/0.50/8, gpt-4o-mini 0.15/0.075/0.60, o4-mini 1.10/0.275/4.40,
text-embedding-3-small 0.02, Claude Sonnet 4.5 3/3.75 (5m write)/0.30/15 and above 200k input
6/7.50/0.60/22.50, Claude Haiku 4.5 1/1.25 (5m)/2 (1h)/0.10/5, Gemini 2.5 Pro 1.25/0.125/10,
DeepSeek chat 0.27 (miss)/0.07 (hit)/1.10.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_cost_exporter.events import Attribution, Cost, TokenCounts, UsageEvent
from llm_cost_exporter.price_db import GenAIPricesDB
from llm_cost_exporter.price_table import PriceTable, load_price_table, parse_price_table
from llm_cost_exporter.pricer import Pricer, name_variants
from llm_cost_exporter.pricing import Rates
from llm_cost_exporter.usage import parse_response
from llm_cost_exporter.validation import ConfigError, Problems

from conftest import payload

AT = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
M = D(1_000_000)


@pytest.fixture(scope="module")
def db() -> GenAIPricesDB:
    return GenAIPricesDB()


def _cost(pricer: Pricer, provider: str, model: str, tokens: TokenCounts) -> D:
    price = pricer.resolve(provider, model, AT)
    assert price is not None, f"{provider}/{model} should be priced"
    return price.cost(tokens).total


CASES = [
    ("openai_chat_cached_reasoning.json", "openai",
     # 464×2.00 + 1536×0.50 + 500×8.00 (reasoning 320 is inside the 500) = 0.005696
     (464 * D(2) + 1536 * D("0.5") + 500 * D(8)) / M, D("0.005696")),
    ("openai_chat_stream.sse", "openai",
     # 1760×0.15 + 10240×0.075 + 800×0.60 = 0.000264 + 0.000768 + 0.00048 = 0.001512
     (1760 * D("0.15") + 10240 * D("0.075") + 800 * D("0.6")) / M, D("0.001512")),
    ("openai_responses.json", "openai",
     # 904×1.10 + 4096×0.275 + 1200×4.40 = 0.0009944 + 0.0011264 + 0.00528 = 0.0074008
     (904 * D("1.1") + 4096 * D("0.275") + 1200 * D("4.4")) / M, D("0.0074008")),
    ("openai_embeddings.json", "openai",
     # 8000×0.02 = 0.00016
     8000 * D("0.02") / M, D("0.00016")),
    ("anthropic_messages_cache.json", "anthropic",
     # 40×3 + 3000×3.75 + 12000×0.30 + 700×15 = 0.00012 + 0.01125 + 0.0036 + 0.0105 = 0.02547
     (40 * D(3) + 3000 * D("3.75") + 12000 * D("0.3") + 700 * D(15)) / M, D("0.02547")),
    ("anthropic_messages_cache_1h.json", "anthropic",
     # 100×1 + 1000×1.25 (5m) + 4000×2 (1h) + 20000×0.10 + 300×5
     # = 0.0001 + 0.00125 + 0.008 + 0.002 + 0.0015 = 0.01285
     (100 * D(1) + 1000 * D("1.25") + 4000 * D(2) + 20000 * D("0.1") + 300 * D(5)) / M,
     D("0.01285")),
    ("anthropic_stream.sse", "anthropic",
     # 2500×1 + 50000×0.10 + 400×5 = 0.0025 + 0.005 + 0.002 = 0.0095
     (2500 * D(1) + 50000 * D("0.1") + 400 * D(5)) / M, D("0.0095")),
    ("gemini_thoughts_cached.json", "gemini",
     # 2000×1.25 + 8000×0.125 + (400+1200)×10 = 0.0025 + 0.001 + 0.016 = 0.0195
     (2000 * D("1.25") + 8000 * D("0.125") + 1600 * D(10)) / M, D("0.0195")),
    ("deepseek_cache.json", "deepseek",
     # 4400×0.27 + 25600×0.07 + 1000×1.10 = 0.001188 + 0.001792 + 0.0011 = 0.00408
     (4400 * D("0.27") + 25600 * D("0.07") + 1000 * D("1.1")) / M, D("0.00408")),
]


@pytest.mark.parametrize(("name", "provider", "arithmetic", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_payload_costs_exactly(db: GenAIPricesDB, name: str, provider: str, arithmetic: D,
                               expected: D) -> None:
    model, tokens = parse_response(payload(name), provider)
    assert model is not None
    assert arithmetic == expected
    assert _cost(Pricer(PriceTable(), db), provider, model, tokens) == expected


def test_long_context_tier_prices_the_whole_request_higher(db: GenAIPricesDB) -> None:
    pricer = Pricer(PriceTable(), db)
    tokens = TokenCounts(input=150_000, cache_read=100_000, output=1000)  # 250k > 200k
    # 150000×6 + 100000×0.60 + 1000×22.50 = 0.9 + 0.06 + 0.0225 = 0.9825
    assert _cost(pricer, "anthropic", "claude-sonnet-4-5", tokens) == D("0.9825")
    at_threshold = TokenCounts(input=100_000, cache_read=100_000, output=1000)  # exactly 200k
    # 100000×3 + 100000×0.30 + 1000×15 = 0.3 + 0.03 + 0.015 = 0.345 (base tier)
    assert _cost(pricer, "anthropic", "claude-sonnet-4-5", at_threshold) == D("0.345")


OVERRIDES = {
    "models": [
        {"model": "gpt-4o", "provider": "openai", "input": 2.25, "cache_read": "1.125",
         "output": 9},
        {"model": "llama-3.1-70b-internal", "input": 0.2, "output": 0.2},
        {"model": "big-ctx", "input": 1, "output": 2,
         "tiers": [{"above_input_tokens": 1000, "input": 10, "output": 20}]},
    ],
    "aliases": {"prod-gpt4o": "gpt-4o"},
    "provider_aliases": {"llm-gateway": "openai"},
}


def _table(data: object = OVERRIDES) -> PriceTable:
    problems = Problems()
    table = parse_price_table(data, "pricing", problems)
    problems.raise_if_any()
    return table


def test_override_wins_over_database_even_for_a_dated_snapshot(db: GenAIPricesDB) -> None:
    pricer = Pricer(_table(), db)
    tokens = TokenCounts(input=1000, cache_read=1000, output=1000)
    # Negotiated: 1000×2.25 + 1000×1.125 + 1000×9 = 0.00225 + 0.001125 + 0.009 = 0.012375
    expected = (1000 * D("2.25") + 1000 * D("1.125") + 1000 * D(9)) / M
    assert expected == D("0.012375")
    for model in ("gpt-4o", "gpt-4o-2024-08-06", "openai/gpt-4o", "prod-gpt4o"):
        assert _cost(pricer, "openai", model, tokens) == expected, model
    # The provider-specific override does not leak to another provider's gpt-4o.
    azure = pricer.resolve("azure", "gpt-4o", AT)
    assert azure is not None and azure.source.startswith("genai-prices")


def test_provider_alias_prices_a_gateway_as_openai(db: GenAIPricesDB) -> None:
    pricer = Pricer(_table(), db)
    tokens = TokenCounts(input=1000, output=1000)
    # gpt-4o-mini list price through the gateway: 1000×0.15 + 1000×0.60 = 0.00075
    assert _cost(pricer, "llm-gateway", "gpt-4o-mini", tokens) == D("0.00075")


def test_self_hosted_model_and_override_tiers() -> None:
    pricer = Pricer(_table(), None)
    # 1500×0.20 + 250×0.20 = 0.00035
    assert _cost(pricer, "vllm", "llama-3.1-70b-internal",
                 TokenCounts(input=1500, output=250)) == D("0.00035")
    # 1001 input > 1000 threshold: whole request at 10/20: 1001×10 + 10×20 = 0.01021
    assert _cost(pricer, "x", "big-ctx", TokenCounts(input=1001, output=10)) == D("0.01021")
    # 1000 is not above the threshold: 1000×1 + 10×2 = 0.00102
    assert _cost(pricer, "x", "big-ctx", TokenCounts(input=1000, output=10)) == D("0.00102")


def test_unknown_model_is_not_guessed(db: GenAIPricesDB) -> None:
    pricer = Pricer(_table(), db)
    assert pricer.resolve("openai", "my-finetune-xyz", AT) is None
    # A provider genai-prices does not know is not guessed from the model name either.
    assert pricer.resolve("vllm", "gpt-4o", AT) is None
    event = UsageEvent(Attribution("d", "p"), "openai", "my-finetune-xyz",
                       TokenCounts(input=10), AT)
    quote = pricer.price(event)
    assert (quote.priced, quote.cost) == (False, D(0))


def test_output_tokens_on_an_input_only_model_are_unpriced(db: GenAIPricesDB) -> None:
    pricer = Pricer(PriceTable(), db)
    event = UsageEvent(Attribution("d", "p"), "openai", "text-embedding-3-small",
                       TokenCounts(input=10, output=5), AT)
    assert pricer.price(event).priced is False


def test_name_variants_order() -> None:
    assert list(name_variants("OpenAI/GPT-4o-2024-08-06", {})) == [
        "openai/gpt-4o-2024-08-06", "gpt-4o-2024-08-06", "gpt-4o"]
    assert list(name_variants("vertex/claude-x@20250101", {"claude-x": "claude-y"})) == [
        "vertex/claude-x@20250101", "claude-x@20250101", "claude-x", "claude-y"]
    assert list(name_variants("prod", {"prod": "gpt-4o"})) == ["prod", "gpt-4o"]


def test_bad_price_file_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("models:\n  - {model: a, input: -1, output: x}\n  - {output: 1}\n"
                   "  - {model: b, input: 1, tiers: [{input: 2}]}\nfoo: 1\n")
    problems = Problems()
    load_price_table(bad, problems, origin="pricing")
    with pytest.raises(ConfigError) as err:
        problems.raise_if_any()
    assert set(err.value.problems) >= {
        "pricing.models[0].input: must be >= 0",
        "pricing.models[0].output: must be a number",
        "pricing.models[1].model: is required",
        "pricing.models[1].input: is required",
        "pricing.models[2].tiers[0].above_input_tokens: must be >= 1",
        "pricing.foo: unknown key (allowed: aliases, models, provider_aliases)",
    }


def _plain_cost(r: Rates, t: TokenCounts) -> Cost:
    """Every bucket by its formula, zeros included: what Rates.cost_of must equal."""
    output = r.output if r.output is not None else D(0)
    cache_read = r.input if r.cache_read is None else r.cache_read
    write_5m = r.input if r.cache_write is None else r.cache_write
    write_1h = write_5m if r.cache_write_1h is None else r.cache_write_1h
    reasoning = output if r.reasoning is None else r.reasoning
    return Cost(
        input=t.input * r.input / M,
        cache_read=t.cache_read * cache_read / M,
        cache_write=((t.cache_write - t.cache_write_1h) * write_5m
                     + t.cache_write_1h * write_1h) / M,
        output=((t.output - t.reasoning) * output + t.reasoning * reasoning) / M
        + r.per_request)


# Prices as tables write them: 0, whole dollars, cents, and sub-cent rates with trailing
# zeros (the exponent is what the zero shortcuts must reproduce).
_prices = st.sampled_from(["0", "0.0", "1", "2", "15", "0.15", "0.075", "0.60", "0.5000",
                           "3.75", "0.0375", "1.10", "22.50", "0.000001"]).map(D)
_opt_prices = st.none() | _prices
_counts = st.sampled_from([0, 0, 1, 7, 320, 1024, 200_001])


@settings(max_examples=400, deadline=None)
@given(rates=st.builds(Rates, input=_prices, output=_opt_prices, cache_read=_opt_prices,
                       cache_write=_opt_prices, cache_write_1h=_opt_prices,
                       reasoning=_opt_prices, per_request=_prices),
       counts=st.tuples(_counts, _counts, _counts, _counts, _counts, _counts))
def test_cost_of_is_the_plain_formula_digit_for_digit(rates: Rates,
                                                      counts: tuple[int, ...]) -> None:
    n_input, n_read, write_5m, write_1h, visible, n_reasoning = counts
    tokens = TokenCounts(input=n_input, cache_read=n_read, cache_write=write_5m + write_1h,
                         cache_write_1h=write_1h, output=visible + n_reasoning,
                         reasoning=n_reasoning)
    got, want = rates.cost_of(tokens), _plain_cost(rates, tokens)
    # str, not ==: the same value with another exponent would change the ledger's text.
    assert [str(v) for v in (got.input, got.cache_read, got.cache_write, got.output)] == \
        [str(v) for v in (want.input, want.cache_read, want.cache_write, want.output)]
    assert str(rates.total_of(tokens)) == str(want.total)  # what ingest stores


def test_a_price_that_changes_on_the_half_hour_is_not_held_past_it(db: GenAIPricesDB) -> None:
    """genai-prices gives DeepSeek off-peak prices from 16:30 to 00:30 UTC (input 0.135
    against 0.27 per 1M): one Pricer, asked within the same hour on both sides of :30."""
    pricer = Pricer(PriceTable(), db)

    def input_rate(hhmm: str) -> D:
        price = pricer.resolve("deepseek", "deepseek-chat",
                               datetime.fromisoformat(f"2026-03-14T{hhmm}:00+00:00"))
        assert price is not None
        return price.base.input

    assert [input_rate(t) for t in ("00:10", "00:29", "00:40", "00:10", "16:20", "16:40")] \
        == [D("0.135"), D("0.135"), D("0.27"), D("0.135"), D("0.27"), D("0.135")]
    # The same answers in a time zone of another offset (+05:30): 06:10 there is 00:40 UTC.
    at = datetime.fromisoformat("2026-03-14T06:10:00+05:30")
    price = pricer.resolve("deepseek", "deepseek-chat", at)
    assert price is not None and price.base.input == D("0.27")


def test_a_price_at_the_end_of_time_does_not_overflow(db: GenAIPricesDB) -> None:
    pricer = Pricer(PriceTable(), db)
    last = datetime(9999, 12, 31, 23, 50, tzinfo=UTC)  # its 15-minute span ends past max
    first = pricer.resolve("openai", "gpt-4o", last)
    assert first is not None and pricer.resolve("openai", "gpt-4o", last) is first
