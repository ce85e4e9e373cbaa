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


class LabelTicket:
    """What labelling one batch reserved: new values it may use and the events that went
    over the cap. Settled once the batch's commit is known (LabelGuard.settle)."""

    __slots__ = ("overflowed", "reserved")

    def __init__(self) -> None:
        self.reserved: list[tuple[int, str, str]] = []  # (event position, label, value)
        self.overflowed: list[tuple[int, str]] = []     # (event position, label)


class LabelGuard:
    """Maps raw attribution to exported label values.

    Values named in config always pass. Other values are admitted first-come until
    `max_values` distinct values of that label exist; later ones become `other` and are
    counted, so a typo storm or an attacker cannot create unbounded series.

    A new value is only *reserved* while its batch is being committed, and admitted (or
    released) when the commit is known: a batch that is refused, fails, or turns out to be a
    replay of one already recorded takes no slot and counts no overflow.
    """

    def __init__(self, max_values: int, known: dict[str, Iterable[str]] | None = None) -> None:
        self._max = max_values
        self._known = {name: frozenset((known or {}).get(name, ())) for name in GUARDED}
        self._admitted: dict[str, set[str]] = {name: set() for name in GUARDED}
        # Values in use by batches not yet settled, with how many events hold each.
        self._reserved: dict[str, Counter[str]] = {name: Counter() for name in GUARDED}
        self.overflow: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Raw (department, project, provider, model) -> labels, for label sets whose values
        # are all known or admitted: an admitted value stays admitted, so the answer cannot
        # change until a reconfigure. Sets with a reserved or overflowing value are never
        # cached (each event must reserve or be counted).
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

    def _map(self, label: str, value: str, ticket: LabelTicket | None,
             position: int) -> str:
        if value in self._known[label]:
            return value
        admitted = self._admitted[label]
        if value in admitted:
            return value
        reserved = self._reserved[label]
        if value in reserved or len(admitted) + len(reserved) < self._max:
            if ticket is not None:
                reserved[value] += 1
                ticket.reserved.append((position, label, value))
            return value
        if ticket is not None:
            ticket.overflowed.append((position, label))
        return OVERFLOW

    def labels_for(self, event: UsageEvent, ticket: LabelTicket | None = None,
                   position: int = 0) -> SeriesLabels:
        """The event's labels. With a ticket, new values are reserved on it (settle it
        after the commit); without one, nothing is reserved or counted (a lookup)."""
        raw = (event.attribution.department, event.attribution.project, event.provider,
               event.model)
        cached = self._cache.get(raw)
        if cached is not None:
            return cached
        with self._lock:
            labels = SeriesLabels(
                department=self._map("department", raw[0], ticket, position),
                project=self._map("project", raw[1], ticket, position),
                provider=self._map("provider", raw[2], ticket, position),
                model=self._map("model", raw[3], ticket, position),
            )
            # All known or admitted: nothing was reserved or counted, and labels == raw.
            if self._all_admitted(raw):
                if len(self._cache) >= 50_000:  # bounded: combinations can outgrow values
                    self._cache.clear()
                self._cache[raw] = labels
            return labels

    def _all_admitted(self, raw: tuple[str, str, str, str]) -> bool:
        return all(value in self._known[label] or value in self._admitted[label]
                   for label, value in zip(GUARDED, raw, strict=True))

    def settle(self, ticket: LabelTicket, written: Iterable[int]) -> None:
        """The batch is committed (events at `written` positions are in the ledger) or not
        (nothing written): reserved values of written events are admitted, the others
        released; overflow is counted for written events only."""
        written = set(written)
        with self._lock:
            for position, label, value in ticket.reserved:
                reserved = self._reserved[label]
                reserved[value] -= 1
                if reserved[value] <= 0:
                    del reserved[value]
                if position in written:
                    self._admitted[label].add(value)
            for position, label in ticket.overflowed:
                if position in written:
                    self.overflow[label] += 1
        ticket.reserved.clear()
        ticket.overflowed.clear()

    def scope_of(self, attribution: Attribution) -> tuple[str, str]:
        """(department, project) as they will be exported: what budgets are checked on."""
        with self._lock:
            return (self._map("department", attribution.department, None, 0),
                    self._map("project", attribution.project, None, 0))
