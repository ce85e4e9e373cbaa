"""Replicas on PostgreSQL under faults: a replica killed with -9, the database restarted.

The invariant checked after each: every event acknowledged with 202 is in the database, and
the sum of the replicas' counters equals the number of events in the database (nothing
acknowledged is lost, nothing is counted twice). Waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from conftest import ExporterProcess, metric_value, wait_until
from helpers.postgres import PgServer, count_events, replica_config, request_ids

SERIES = {"department": "engineering", "project": "ai-features", "provider": "openai",
          "model": "gpt-4o-mini", "outcome": "success"}


def event(request_id: str) -> dict[str, Any]:
    # gpt-4o-mini, 1,000 input tokens at $0.15/M = $0.00015 each
    return {"request_id": request_id, "department": "engineering", "project": "ai-features",
            "provider": "openai", "model": "gpt-4o-mini", "tokens": {"input": 1000}}


def counted(replicas: list[ExporterProcess]) -> int:
    return int(sum(metric_value(r.metrics(), "llm_requests_total", **SERIES) or 0
                   for r in replicas))


class Traffic:
    """Client threads posting batches with fresh request ids; remembers what was acked."""

    def __init__(self, send: Callable[[httpx.Client, int, list[dict[str, Any]]],
                                      list[bool]], workers: int, batch: int) -> None:
        self.acked: set[str] = set()
        self.unacked: list[list[dict[str, Any]]] = []  # 503, refused, reset: retry later
        self.sent_ids: set[str] = set()
        self.statuses: list[tuple[int, int]] = []  # (sequence, 202/503/0 for no answer)
        self._send, self._batch = send, batch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                         for w in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=20) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                batch = [event(f"w{worker}-{n}-{j}") for j in range(self._batch)]
                with self._lock:
                    self.sent_ids.update(e["request_id"] for e in batch)
                for ok in self._send(client, n, batch):
                    with self._lock:
                        self.statuses.append((next(self._seq), 202 if ok else 0))
                        if ok:
                            self.acked.update(e["request_id"] for e in batch)
                        else:
                            self.unacked.append(batch)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def post(client: httpx.Client, replica: ExporterProcess, batch: list[dict[str, Any]]) -> bool:
    try:
        return client.post(f"{replica.url}/v1/usage", json=batch).status_code == 202
    except httpx.HTTPError:
        return False


def settle(traffic: Traffic, replicas: list[ExporterProcess], pg_dsn: str) -> None:
    in_db = request_ids(pg_dsn)
    assert traffic.acked <= in_db, f"{len(traffic.acked - in_db)} acknowledged events lost"
    assert counted(replicas) == len(in_db) == count_events(pg_dsn)
    # The client retries what it was not told was recorded: afterwards, all of it, once.
    for batch in traffic.unacked:
        assert replicas[-1].post_usage(batch).status_code == 202
    assert request_ids(pg_dsn) == traffic.sent_ids
    assert counted(replicas) == len(traffic.sent_ids) == count_events(pg_dsn)


def test_kill9_of_a_replica_under_concurrent_ingest(
        exporter_factory: Callable[..., ExporterProcess], pg_dsn: str, tmp_path: Path) -> None:
    a = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-a"))
    b = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-b"))

    def send(client: httpx.Client, n: int, batch: list[dict[str, Any]]) -> list[bool]:
        first, other = (a, b) if n % 2 else (b, a)
        # Every third batch is also sent to the other replica, as a client retrying
        # elsewhere would: the two copies race on the same request ids.
        return [post(client, r, batch) for r in ([first, other] if n % 3 == 0 else [first])]

    traffic = Traffic(send, workers=4, batch=10)
    try:
        wait_until(lambda: len(traffic.acked) >= 600, 30, "traffic acknowledged by both")
        a.kill9()
        seen = len(traffic.acked)
        wait_until(lambda: len(traffic.acked) >= seen + 300, 30, "replica b to carry on")
    finally:
        traffic.stop()
    assert traffic.unacked, "some requests to the killed replica must have failed"
    a.start()  # same instance name: its counters come back from its own rows
    settle(traffic, [a, b], pg_dsn)


def test_database_stopped_and_restarted_under_traffic(
        exporter_factory: Callable[..., ExporterProcess], pg: PgServer, pg_dsn: str,
        tmp_path: Path) -> None:
    a = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-a"))
    b = exporter_factory(replica_config(pg_dsn, tmp_path, "replica-b"))
    traffic = Traffic(lambda client, n, batch: [post(client, (a, b)[n % 2], batch)],
                      workers=2, batch=1)

    def ready(replica: ExporterProcess) -> int:
        return httpx.get(f"{replica.url}/readyz", timeout=10).status_code

    def answered_since(mark: int, ok: bool) -> bool:
        return any(seq > mark and (status == 202) == ok for seq, status in traffic.statuses)

    try:
        wait_until(lambda: len(traffic.acked) >= 40, 20, "traffic before the outage")
        try:
            pg.stop()
            mark = len(traffic.statuses)
            wait_until(lambda: answered_since(mark, ok=False), 20, "503 while the database "
                       "is down")
            assert ready(a) == ready(b) == 503
        finally:
            pg.start()
        mark = len(traffic.statuses)
        wait_until(lambda: ready(a) == ready(b) == 200, 30, "both replicas ready again")
        wait_until(lambda: answered_since(mark, ok=True), 30, "202 after the restart")
    finally:
        traffic.stop()
    settle(traffic, [a, b], pg_dsn)
