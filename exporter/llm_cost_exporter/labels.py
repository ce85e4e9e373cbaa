"""Bound label cardinality: known values pass, new values are admitted up to a cap."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable

from llm_cost_exporter.events import Attribution, SeriesLabels, UsageEvent

OVERFLOW = "other"
# Control characters and lone UTF-16 surrogates (which cannot be encoded as UTF-8, so cannot
# be stored nor exported) are never part of a label value.
_INVALID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def label_problem(value: object, max_length: int) -> str | None:
    """Why `value` cannot be a label value, or None if it can."""
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if len(value) > max_length:
        return f"longer than {max_length} characters"
    if _INVALID.search(value):
        return "must not contain control characters or invalid Unicode"
    return None


def sanitize(value: str, max_length: int) -> str:
    """A usable label from a value we cannot refuse (a model the provider already served)."""
    cleaned = _INVALID.sub("\ufffd", value).strip()[:max_length]
    return cleaned or "unknown"
GUARDED = ("department", "project", "provider", "model")


class LabelGuard:
    """Maps raw attribution to exported label values.

    Values named in config always pass. Other values are admitted first-come until
    `max_values` distinct values of that label exist; later ones become `other` and are
    counted, so a typo storm or an attacker cannot create unbounded series.
    """

    def __init__(self, max_values: int, known: dict[str, Iterable[str]] | None = None) -> None:
        self._max = max_values
        self._known = {name: frozenset((known or {}).get(name, ())) for name in GUARDED}
        self._admitted: dict[str, set[str]] = {name: set() for name in GUARDED}
        self.overflow: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Raw (department, project, provider, model) -> labels, for label sets that passed
        # whole: an admitted value stays admitted, so the answer cannot change until a
        # reconfigure. Overflowing sets are never cached (each event must be counted).
        self._cache: dict[tuple[str, str, str, str], SeriesLabels] = {}

    def reconfigure(self, max_values: int, known: dict[str, Iterable[str]]) -> None:
        """A reloaded config: new cap and known values; admitted values stay admitted."""
        with self._lock:
            self._max = max_values
            self._known = {name: frozenset(known.get(name, ())) for name in GUARDED}
            self._cache = {}

    def seed(self, label: str, values: Iterable[str]) -> None:
        """Re-admit values already in the ledger, so a restart keeps the same series."""
        with self._lock:
            admitted = self._admitted[label]
            for value in values:
                if value != OVERFLOW and value not in self._known[label]:
                    admitted.add(value)

    def _map(self, label: str, value: str, count: bool = True) -> str:
        if value in self._known[label]:
            return value
        admitted = self._admitted[label]
        if value in admitted:
            return value
        if len(admitted) < self._max:
            admitted.add(value)
            return value
        if count:
            self.overflow[label] += 1
        return OVERFLOW

    def labels_for(self, event: UsageEvent) -> SeriesLabels:
        raw = (event.attribution.department, event.attribution.project, event.provider,
               event.model)
        cached = self._cache.get(raw)
        if cached is not None:
            return cached
        with self._lock:
            labels = SeriesLabels(
                department=self._map("department", raw[0]),
                project=self._map("project", raw[1]),
                provider=self._map("provider", raw[2]),
                model=self._map("model", raw[3]),
            )
            if (labels.department, labels.project, labels.provider, labels.model) == raw:
                if len(self._cache) >= 50_000:  # bounded: combinations can outgrow values
                    self._cache.clear()
                self._cache[raw] = labels
            return labels

    def scope_of(self, attribution: Attribution) -> tuple[str, str]:
        """(department, project) as they will be exported: what budgets are checked on."""
        with self._lock:
            # Not counted as overflow here: the event's own labels_for() counts it once.
            return (self._map("department", attribution.department, count=False),
                    self._map("project", attribution.project, count=False))
