"""Process-local health counters of the exporter itself (not part of the ledger)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

REJECT_REASONS = ("invalid", "unauthorized", "too_large", "unavailable")


@dataclass
class ExporterStats:
    ingest_rejected: Counter[str] = field(default_factory=Counter)
    ledger_write_errors: int = 0
    ledger_up: bool = True
    config_reload_ok: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.ingest_rejected[reason] += 1

    def ledger_error(self) -> None:
        with self._lock:
            self.ledger_write_errors += 1
            self.ledger_up = False
