"""Process faults (issue #5): kill -9 during concurrent ingest, SIGTERM with requests in flight.

The promise under test (README, Ingest API): "every event is committed to the ledger before
this answer [202]", a retried `request_id` or a retried batch's Idempotency-Key is counted
once, and a batch is all or nothing.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conftest import ExporterProcess, metric_value, wait_until
from helpers.robustness import expect_continue, integrity_check, ledger_query, read_response

KILLS = 10
CLIENTS = 4
BATCH = 25
# Every bound is generous for a noisy 2-core machine; a healthy run takes a fraction.
TEST_DEADLINE_SECONDS = 120


def _event(request_id: str, n: int, keyed: bool = False) -> dict[str, Any]:
    # Token counts vary with n so the counter sums check more than "how many". A keyed
    # client's events carry no request_id (its batches' Idempotency-Key is all the exporter
    # has to know a retry); their id travels in `user`, which the ledger stores, to check.
    return {"request_id" if not keyed else "user": request_id, "provider": "openai",
            "model": "gpt-4o", "department": "engineering",
            "project": f"client-{request_id.split('-')[0]}",
            "tokens": {"input": 1 + n % 7, "output": 2 + n % 5}}


@dataclass
class Ack:
    """A batch the exporter answered 202, and how many attempts it took."""

    ids: list[str]
    input_tokens: int
    attempts: int
    accepted: int
    duplicates: int
    replayed: bool


@dataclass
class IngestClient:
    """Posts batches with unique request_ids (or, if keyed, with an Idempotency-Key and no
    request_ids); on a connection error retries the SAME batch (same ids, same key, same
    bytes), as the README tells reporters to, until it gets a 202."""

    index: int
    url: str
    stop: threading.Event
    deadline: float
    acked: threading.Condition
    keyed: bool = False
    acks: list[Ack] = field(default_factory=list)
    transport_errors: int = 0
    error: str | None = None

    def run(self) -> None:
        # One client per thread: keep-alive, and no TLS context built per request (that
        # costs more CPU than the exporter's work on a 2-core machine).
        with httpx.Client(timeout=15) as http:
            try:
                number = 0
                while not self.stop.is_set():
                    self._post_until_acknowledged(http, number)
                    number += 1
            except Exception as exc:  # reported by the test, not lost in a thread
                with self.acked:
                    self.error = f"client {self.index}: {exc!r}"
                    self.acked.notify_all()

    def _post_until_acknowledged(self, http: httpx.Client, number: int) -> None:
        ids = [f"{self.index}-{number}-{i}" for i in range(BATCH)]
        base = (self.index * 1_000_000 + number * BATCH)
        events = [_event(rid, base + i, self.keyed) for i, rid in enumerate(ids)]
        body = json.dumps(events).encode()
        headers = {"Content-Type": "application/json"}
        if self.keyed:
            headers["Idempotency-Key"] = f"batch-{self.index}-{number}"
        attempts = 0
        while time.monotonic() < self.deadline:
            attempts += 1
            try:
                r = http.post(f"{self.url}/v1/usage", content=body, headers=headers)
            except httpx.TransportError:
                # Killed or restarting: back off briefly (bounded by the deadline), retry.
                self.transport_errors += 1
                self.stop.wait(0.02)
                continue
            if r.status_code == 503:  # documented as "nothing recorded, retry"
                continue
            assert r.status_code == 202, f"batch {ids[0]}: {r.status_code} {r.text}"
            body = r.json()
            with self.acked:
                self.acks.append(Ack(ids, sum(e["tokens"]["input"] for e in events), attempts,
                                     body["accepted"], body["duplicates"],
                                     r.headers.get("idempotent-replayed") == "true"))
                self.acked.notify_all()
            return
        raise AssertionError(f"batch {ids[0]} not acknowledged before the deadline")


def _acknowledged(clients: list[IngestClient]) -> int:
    return sum(len(c.acks) for c in clients)


def _check_ledger_consistent(path: Path) -> int:
    """integrity_check passes and the running totals equal the events they summarise (both
    are written in one transaction, so a crash may lose neither half alone). Returns the
    number of events."""
    assert integrity_check(path) == ["ok"]
    (events, inputs), = ledger_query(path, "SELECT COUNT(*), COALESCE(SUM(input), 0) "
                                           "FROM events")
    (requests, total_inputs), = ledger_query(
        path, "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(input), 0) FROM totals")
    assert (requests, total_inputs) == (events, inputs), "totals disagree with events"
    return int(events)


def test_kill9_during_concurrent_ingest_loses_and_doubles_nothing(
        exporter_factory: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    ledger = tmp_path / "kill9.db"
    exporter = exporter_factory({"ledger": {"path": str(ledger)}})
    stop = threading.Event()
    deadline = time.monotonic() + TEST_DEADLINE_SECONDS
    acked = threading.Condition()
    # Half the clients deduplicate by request_id, half by Idempotency-Key alone.
    clients = [IngestClient(i, exporter.url, stop, deadline, acked, keyed=i % 2 == 1)
               for i in range(CLIENTS)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        for kill in range(KILLS):
            # Let each life of the process acknowledge some batches, then kill it the moment
            # the last of them is acknowledged (a window where an ack could precede its
            # commit is then open), while the other clients' requests are in flight.
            target = _acknowledged(clients) + CLIENTS
            with acked:
                assert acked.wait_for(lambda t=target: _acknowledged(clients) >= t
                                      or any(c.error for c in clients), timeout=30), \
                    f"no acknowledgements before kill {kill}"
                exporter.kill9()
            _check_ledger_consistent(ledger)
            exporter.start()
    finally:
        stop.set()  # each client finishes (and if need be retries) its current batch
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a client did not finish its last batch"
    assert [c.error for c in clients if c.error] == []

    acks = [a for c in clients for a in c.acks]
    retried = [a for a in acks if a.attempts > 1]
    # The kills really hit requests in flight (else this test proves nothing).
    assert sum(c.transport_errors for c in clients) > 0 and retried

    for a in acks:
        assert a.accepted + a.duplicates == BATCH, a
        # All or nothing: a retried batch was either wholly committed before the kill (all
        # duplicates now) or not at all (all accepted now), never half.
        assert (a.accepted, a.duplicates) in ((BATCH, 0), (0, BATCH)), a
        if a.attempts == 1:
            assert a.duplicates == 0 and not a.replayed, a
    # Keyed batches cannot show duplicates (their events have no request_id): a retry of
    # one committed before the kill is answered as a replay of its first answer instead.
    keyed = {c.index for c in clients if c.keyed}
    assert all(a.duplicates == 0 for a in acks if int(a.ids[0].split("-")[0]) in keyed)

    # After one more restart: every acknowledged event is in the ledger exactly once...
    exporter.kill9()
    events = _check_ledger_consistent(ledger)
    exporter.start()
    acked_ids = {rid for a in acks for rid in a.ids}
    stored = {row[0] for row in ledger_query(
        ledger, "SELECT COALESCE(request_id, user_name) FROM events")}
    assert acked_ids <= stored, f"{len(acked_ids - stored)} acknowledged events lost"
    # ...and nothing else: every batch a client started was finally acknowledged.
    assert stored == acked_ids
    assert events == len(acked_ids) == sum(a.accepted + a.duplicates for a in acks)

    # The counters (read from the ledger's running totals at start) count each event once.
    text = exporter.metrics()
    requests = sum(metric_value(text, "llm_requests_total", project=f"client-{i}",
                                outcome="success") or 0 for i in range(CLIENTS))
    inputs = sum(metric_value(text, "llm_tokens_total", project=f"client-{i}",
                              token_type="input") or 0 for i in range(CLIENTS))
    assert requests == len(acked_ids)
    assert inputs == sum(a.input_tokens for a in acks)


def test_sigterm_lets_requests_in_flight_finish_and_commits_them(
        exporter_factory: Callable[..., ExporterProcess], tmp_path: Path) -> None:
    ledger = tmp_path / "sigterm.db"
    exporter = exporter_factory({"ledger": {"path": str(ledger)}})
    assert exporter.proc is not None
    # One batch at the maximum size (the slowest to validate, price and commit) and two
    # small ones, all three in the app's hands when the signal arrives.
    sizes = [10_000, 3, 1]
    bodies = [httpx.Request("POST", "http://x", json=[
        _event(f"{k}-term-{i}", i) for i in range(n)]).content for k, n in enumerate(sizes)]
    sockets = [expect_continue(exporter.port, "/v1/usage", len(body)) for body in bodies]
    assert exporter.log_path is not None
    log_path = exporter.log_path
    try:
        exporter.proc.send_signal(signal.SIGTERM)
        # Send the bodies only once the server is in its graceful wait, so the requests are
        # provably in flight during shutdown (not finished before it began).
        wait_until(lambda: "Waiting for connections to close" in log_path.read_text(), 20,
                   "uvicorn to start its graceful shutdown")
        for sock, body in zip(sockets, bodies, strict=True):
            try:
                sock.sendall(body)
            except OSError as exc:
                raise AssertionError(f"a request in flight was cut at SIGTERM: {exc!r}") from exc
        answers = [read_response(sock, 60) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert [(a.status, a.json()) for a in answers] == [
        (202, {"accepted": n, "duplicates": 0}) for n in sizes]
    # A graceful stop. uvicorn re-raises the signal it caught once shutdown is complete, so
    # the exit status is -SIGTERM (0 on versions that do not); what makes it graceful is that
    # the app's shutdown (which drains the commit queue) completed, with no error logged.
    assert exporter.proc.wait(30) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "Application shutdown complete" in log, log[-3000:]
    assert '"level": "error"' not in log, log[-3000:]

    assert integrity_check(ledger) == ["ok"]
    assert ledger_query(ledger, "SELECT COUNT(*) FROM events") == [(sum(sizes),)]
    exporter.start()
    text = exporter.metrics()
    assert metric_value(text, "llm_requests_total", project="client-0") == sizes[0]
    assert sum(metric_value(text, "llm_requests_total", project=f"client-{k}") or 0
               for k in range(3)) == sum(sizes)
