"""The usage families of /metrics, rendered straight from the ledger's running totals.

These are the only families whose size grows with traffic (tens of thousands of series in a
big deployment), so they are written here rather than through prometheus_client, which
re-validates and re-escapes every label of every sample on every scrape. Each label set's
escaped text is built once and cached. Both the classic text format (0.0.4) and OpenMetrics
are produced; small families (budgets, exporter health) still go through prometheus_client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from decimal import Decimal

from llm_cost_exporter.ledger import LATENCY_BUCKETS, SeriesKey, Totals

_TOKEN_TYPES = ("input", "cache_read", "cache_write", "output")
_LE = (*(repr(b) for b in LATENCY_BUCKETS), "+Inf")

# name (without _total), type, help
_FAMILIES = {
    "requests": ("llm_requests", "counter",
                 "LLM calls recorded, by outcome (success, error, client_closed)."),
    "tokens": ("llm_tokens", "counter", "Billed tokens by disjoint type; the sum over "
               "token_type counts every billed token exactly once."),
    "reasoning": ("llm_reasoning_tokens", "counter", "Reasoning/thinking tokens (already "
                  "inside token_type=output; do not add them again)."),
    "cost": ("llm_cost_usd", "counter", "Cost of LLM calls in US dollars."),
    "unpriced": ("llm_unpriced_requests", "counter", "Calls to models with no known price "
                 "(recorded at cost 0): add the model to the pricing overrides."),
    "estimated": ("llm_estimated_requests", "counter", "Calls whose tokens were estimated "
                  "from the streamed text because the provider reported no usage."),
    "duration": ("llm_request_duration_seconds", "histogram",
                 "Latency of LLM calls as reported or measured."),
}


def escape(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


class UsageRenderer:
    def __init__(self) -> None:
        self._labels: dict[tuple[str, ...], str] = {}

    def _label_text(self, names: tuple[str, ...], values: tuple[str, ...]) -> str:
        key = (*names, *values)
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) > 500_000:  # label sets are capped; this is a backstop
                self._labels.clear()
            text = ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True))
            self._labels[key] = text
        return text

    def chunks(self, totals: Totals, openmetrics: bool, lines_per_chunk: int = 2000
               ) -> Iterator[str]:
        """The exposition in pieces, so a large scrape never holds the whole text at once."""
        out: list[str] = []
        for line in self._lines(totals, openmetrics):
            out.append(line)
            if len(out) >= lines_per_chunk:
                yield "".join(out)
                out.clear()
        if out:
            yield "".join(out)

    def _lines(self, totals: Totals, openmetrics: bool) -> Iterator[str]:
        out: list[str] = []
        series_names = ("department", "project", "provider", "model")
        # Per label set without outcome: input, cache_read, cache_write, output, reasoning,
        # estimated (ints) and cost (Decimal, float only here, in the text).
        by_set: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0] * 6)
        cost: dict[tuple[str, str, str, str], Decimal] = defaultdict(Decimal)
        unpriced: dict[tuple[str, str], int] = defaultdict(int)
        requests: list[str] = []
        for key, t in totals.series.items():
            labels = (key.department, key.project, key.provider, key.model)
            requests.append(f"{{{self._label_text(_SERIES_OUTCOME, key)}}} {t.requests}")
            acc = by_set[labels]
            acc[0] += t.input
            acc[1] += t.cache_read
            acc[2] += t.cache_write
            acc[3] += t.output
            acc[4] += t.reasoning
            acc[5] += t.estimated
            cost[labels] += t.cost
            if t.unpriced:
                unpriced[(key.provider, key.model)] += t.unpriced
        self._family(out, "requests", openmetrics, "llm_requests_total", requests)
        del requests
        yield from out
        out.clear()
        tokens, reasoning, costs, estimated = [], [], [], []
        for labels, acc in by_set.items():
            text = self._label_text(series_names, labels)
            for i, token_type in enumerate(_TOKEN_TYPES):
                tokens.append(f'{{{text},token_type="{token_type}"}} {acc[i]}')
            reasoning.append(f"{{{text}}} {acc[4]}")
            estimated.append(f"{{{text}}} {acc[5]}")
            costs.append(f"{{{text}}} {float(cost[labels])!r}")
        self._family(out, "tokens", openmetrics, "llm_tokens_total", tokens)
        self._family(out, "reasoning", openmetrics, "llm_reasoning_tokens_total", reasoning)
        self._family(out, "cost", openmetrics, "llm_cost_usd_total", costs)
        self._family(out, "unpriced", openmetrics, "llm_unpriced_requests_total", [
            f"{{{self._label_text(('provider', 'model'), pm)}}} {n}"
            for pm, n in unpriced.items()])
        self._family(out, "estimated", openmetrics, "llm_estimated_requests_total", estimated)
        self._histogram(out, totals, openmetrics)
        yield from out

    def _family(self, out: list[str], family: str, openmetrics: bool, sample: str,
                lines: Iterable[str]) -> None:
        name, kind, doc = _FAMILIES[family]
        shown = name if openmetrics else sample
        out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {kind}\n")
        out.extend(f"{sample}{line}\n" for line in lines)

    def _histogram(self, out: list[str], totals: Totals, openmetrics: bool) -> None:
        name, kind, doc = _FAMILIES["duration"]
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        for (provider, model), lat in totals.latency.items():
            text = self._label_text(("provider", "model"), (provider, model))
            running = 0
            for le, count in zip(_LE, lat.counts, strict=True):
                running += count
                out.append(f'{name}_bucket{{{text},le="{le}"}} {running}\n')
            out.append(f"{name}_count{{{text}}} {lat.count}\n")
            out.append(f"{name}_sum{{{text}}} {lat.total!r}\n")


_SERIES_OUTCOME = SeriesKey._fields
