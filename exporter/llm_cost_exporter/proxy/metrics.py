"""Process-local proxy metrics: latency, time to first token, upstream errors, blocks."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, None), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound is None else repr(bound), running))
        return out


class ProxyStats(Collector):
    def __init__(self) -> None:
        self.duration: dict[tuple[str, str], _Histogram] = {}
        self.ttft: dict[tuple[str, str], _Histogram] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.upstream_errors: Counter[tuple[str, str]] = Counter()
        self.blocked: Counter[tuple[str, str]] = Counter()

    def observe(self, provider: str, model: str, seconds: float, ttft: float | None) -> None:
        key = (provider, model)
        self.requests[key] += 1
        hist = self.duration.get(key)
        if hist is None:
            hist = self.duration[key] = _Histogram(DURATION_BUCKETS)
        hist.observe(seconds)
        if ttft is not None:
            first = self.ttft.get(key)
            if first is None:
                first = self.ttft[key] = _Histogram(TTFT_BUCKETS)
            first.observe(ttft)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("llm_proxy_requests_total", "Calls forwarded by the "
                                       "proxy.", labels=["provider", "model"])
        for (provider, model), n in list(self.requests.items()):
            requests.add_metric([provider, model], n)
        duration = HistogramMetricFamily(
            "llm_proxy_request_duration_seconds", "Time from the client's request to the end "
            "of the proxied response.", labels=["provider", "model"])
        for (provider, model), h in list(self.duration.items()):
            duration.add_metric([provider, model], h.buckets(), h.total)
        ttft = HistogramMetricFamily(
            "llm_proxy_time_to_first_token_seconds", "Time from the client's request to the "
            "first streamed bytes of the answer.", labels=["provider", "model"])
        for (provider, model), h in list(self.ttft.items()):
            ttft.add_metric([provider, model], h.buckets(), h.total)
        errors = CounterMetricFamily(
            "llm_proxy_upstream_errors_total", "Upstream failures by class: 4xx, 5xx, "
            "unreachable, timeout.", labels=["provider", "status_class"])
        for (provider, status_class), n in list(self.upstream_errors.items()):
            errors.add_metric([provider, status_class], n)
        blocked = CounterMetricFamily(
            "llm_requests_blocked_total", "Calls refused with 429 because an enforced budget "
            "was spent.", labels=["department", "project"])
        for (department, project), n in list(self.blocked.items()):
            blocked.add_metric([department, project], n)
        yield from (requests, duration, ttft, errors, blocked)
