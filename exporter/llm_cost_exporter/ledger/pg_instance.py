"""One live process per instance name, enforced with a PostgreSQL session advisory lock.

Each replica exports the running totals recorded under its instance name, so two live
processes sharing a name (a shared config file that sets `ledger.instance`) would both export
the same history and `sum()` over replicas would count it twice. The second one is refused.
The lock lives as long as the claiming session: a killed process releases it when the server
notices the closed connection, which the server-side keepalives below bound for a vanished
host too.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any

import psycopg

from llm_cost_exporter.ledger.base import LedgerUnavailable

_CLAIM = "SELECT pg_try_advisory_lock(hashtextextended('llm-cost-exporter instance ' || %s, 0))"
# The server drops a claiming session whose host vanished after about 10 + 3 × 5 = 25 s.
_SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5",
                      "SET tcp_keepalives_count = 3")


class InstanceInUse(LedgerUnavailable):
    """Another live process holds this instance name."""


class InstanceClaim:
    def __init__(self, conninfo: str, kwargs: dict[str, Any], instance: str) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self.instance = instance
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._checked_at = -math.inf

    def acquire(self, wait_seconds: float) -> None:
        """Claim the name, waiting a little for a predecessor's session to go away."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                self.ensure()
                return
            except InstanceInUse:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def ensure(self, max_age: float = 0.0) -> None:
        """Raise unless this process holds the claim (re-claiming after a lost session).

        The claiming session is probed at most every `max_age` seconds: a write path that
        calls this per commit pays one round trip a second, not one per commit.
        """
        with self._lock:
            conn = self._conn
            if conn is not None and time.monotonic() - self._checked_at < max_age:
                return
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    self._checked_at = time.monotonic()
                    return
                except psycopg.Error:
                    # Session gone (database restarted, network cut): the lock went with it.
                    self._drop()
            try:
                conn = psycopg.connect(self._conninfo, **self._kwargs)
                for statement in _SERVER_KEEPALIVES:
                    conn.execute(statement)
                row = conn.execute(_CLAIM, (self.instance,)).fetchone()
            except psycopg.Error as exc:
                raise LedgerUnavailable(f"ledger database unreachable: {exc}") from exc
            if not row or not row[0]:
                conn.close()
                raise InstanceInUse(
                    f"instance name {self.instance!r} is held by another running exporter: "
                    "give every replica its own ledger.instance / $LLM_EXPORTER_INSTANCE")
            self._conn = conn
            self._checked_at = time.monotonic()

    def suspect(self) -> None:
        """The database just failed us: probe the claim on the next ensure()."""
        self._checked_at = -math.inf

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()
