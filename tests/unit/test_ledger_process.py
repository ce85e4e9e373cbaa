"""The SQLite ledger as serve runs it: commits in a writer process, reads and totals here.

Real processes, a real SQLite file: the writer is spawned, killed, locked out and replaced
as in production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from llm_cost_exporter.commit_pipe import PipeCommitQueue
from llm_cost_exporter.events import (
    Attribution,
    PricedEvent,
    SeriesLabels,
    TokenCounts,
    UsageEvent,
)
from llm_cost_exporter.ledger import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LedgerOutcomeUnknown,
    LedgerRejected,
    LedgerUnavailable,
    SeriesKey,
    sqlite_process,
)
from llm_cost_exporter.ledger.sqlite import SQLiteLedger
from llm_cost_exporter.ledger.sqlite_process import SQLiteProcessLedger
from llm_cost_exporter.ledger.sqlite_queries import load_totals
from llm_cost_exporter.ledger.sqlite_writer import FrameReader

TS = datetime(2026, 3, 14, 12, tzinfo=UTC)
KEY = SeriesKey("eng", "app", "openai", "gpt-4o", "success")


def ev(request_id: str | None, cost: str = "0.0025", out_cost: str = "0.001",
       tokens: int = 1000, latency: float | None = 1.5) -> PricedEvent:
    event = UsageEvent(Attribution("eng", "app", user="alice"), "openai", "gpt-4o",
                       TokenCounts(input=tokens, output=tokens // 10), TS,
                       latency_seconds=latency, request_id=request_id)
    return PricedEvent(event=event, labels=SeriesLabels("eng", "app", "openai", "gpt-4o"),
                       cost=D(cost) + D(out_cost), price_source="test")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SQLiteProcessLedger]:
    led = SQLiteProcessLedger(tmp_path / "ledger.db")
    yield led
    led.close()


def writer_pid(led: SQLiteProcessLedger) -> int:
    assert led._proc is not None
    return led._proc.pid


def file_totals(path: Path) -> dict[SeriesKey, object]:
    with sqlite3.connect(path) as conn:
        return dict(load_totals(conn).series)


def test_writes_go_through_the_writer_and_totals_follow(ledger: SQLiteProcessLedger,
                                                        tmp_path: Path) -> None:
    assert writer_pid(ledger) != os.getpid()
    results = ledger.record([[ev("a"), ev("b"), ev("a")], [ev("b"), ev("c")]])
    assert results == [BatchResult(2, 1), BatchResult(1, 1)]
    assert results[0].written == (0, 1)  # type: ignore[union-attr]
    totals = ledger.totals().series[KEY]
    # 3 events x (0.0025 input + 0.001 output) = 3 x 0.0035 = 0.0105 USD
    assert totals.cost == D("0.0105") and str(totals.cost) == "0.0105"
    assert (totals.requests, totals.input, totals.output) == (3, 3000, 300)
    # What this process shows is what the file holds (the writer's own totals).
    assert file_totals(tmp_path / "ledger.db") == ledger.totals().series
    latency = ledger.totals().latency[("openai", "gpt-4o")]
    assert (latency.count, latency.total) == (3, 4.5)
    # Reads run here: budget spend from the spend slots, 0.0105 in [TS, TS + 1 h).
    end = datetime(2026, 3, 14, 13, tzinfo=UTC)
    assert ledger.spend("eng", None, TS, end) == D("0.0105")
    assert ledger.label_values()["project"] == {"app"}


def test_results_keep_their_kind_across_the_pipe(ledger: SQLiteProcessLedger) -> None:
    key = BatchKey("k1", b"digest-1")
    assert ledger.record([[ev(None)]], [key]) == [BatchResult(1, 0)]
    assert ledger.lookup_key(key) == BatchResult(1, 0, (), replayed=True)
    huge = ev(None, cost="5000000")  # 5 M USD for one call: over the ledger's range
    replay, conflict, rejected, fine = ledger.record(
        [[ev(None)], [ev(None)], [ev(None), huge], [ev("ok")]],
        [key, BatchKey("k1", b"another body"), None, None])
    assert isinstance(replay, BatchResult) and replay.replayed and replay.accepted == 1
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(rejected, LedgerRejected) and rejected.position == 1
    assert "out of range" in str(rejected)
    assert fine == BatchResult(1, 0)
    # 1 keyed event + the "ok" one: 2 x 0.0035 = 0.007; nothing of the rejected batch.
    assert ledger.totals().series[KEY].cost == D("0.0070")


def _wait_dead(ledger: SQLiteProcessLedger) -> None:
    # Until the ledger sees it gone (waitpid reaps it only once all its threads are).
    deadline = time.monotonic() + 10
    while ledger.writer_alive():
        assert time.monotonic() < deadline, "the killed writer did not exit"
        time.sleep(0.01)


def test_a_dead_writer_is_replaced_before_the_next_write(ledger: SQLiteProcessLedger,
                                                         tmp_path: Path) -> None:
    ledger.record([[ev("a")]])
    old = writer_pid(ledger)
    os.kill(old, signal.SIGKILL)
    _wait_dead(ledger)
    # The next write starts a new writer first (nothing is refused), which re-reads the
    # totals from the file.
    assert ledger.record([[ev("b"), ev("a")]]) == [BatchResult(1, 1)]
    assert writer_pid(ledger) != old
    assert ledger.totals().series[KEY].requests == 2
    assert file_totals(tmp_path / "ledger.db") == ledger.totals().series


def test_a_writer_lost_after_it_got_the_batch_is_an_unknown_outcome(
        ledger: SQLiteProcessLedger, tmp_path: Path) -> None:
    old = writer_pid(ledger)
    os.kill(old, signal.SIGSTOP)  # it cannot read the batch before it dies
    ledger.send_record([[ev("lost")]], [None])
    os.kill(old, signal.SIGKILL)
    with pytest.raises(LedgerOutcomeUnknown, match="before confirming"):
        ledger.take_reply()
    # A retry with the same id is counted once, whatever happened.
    assert ledger.record([[ev("lost")]]) in ([BatchResult(1, 0)], [BatchResult(0, 1)])
    assert ledger.totals().series[KEY].requests == 1
    assert file_totals(tmp_path / "ledger.db") == ledger.totals().series


def test_the_queue_restarts_the_writer_off_the_loop_and_kills_a_stuck_one(
        ledger: SQLiteProcessLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[str] = []
    real_start = ledger.start_writer

    def spy() -> None:
        starts.append(threading.current_thread().name)
        real_start()

    monkeypatch.setattr(ledger, "start_writer", spy)
    monkeypatch.setattr(sqlite_process, "STALL_SECONDS", 0.2)
    queue = PipeCommitQueue(ledger, reply_timeout=1.0)
    stuck = writer_pid(ledger)
    os.kill(stuck, signal.SIGSTOP)

    async def main() -> tuple[BaseException | BatchResult, BatchResult]:
        first = asyncio.ensure_future(queue.record([ev("s1")]))
        await asyncio.sleep(0.5)
        # The commit has waited longer than STALL_SECONDS: not ready.
        with pytest.raises(LedgerUnavailable, match="has not answered"):
            ledger.check()
        try:
            # killed after 1 s (bounded here, so a broken watchdog fails instead of hanging)
            outcome: BaseException | BatchResult = await asyncio.wait_for(first, 20)
        except LedgerUnavailable as exc:
            outcome = exc
        return outcome, await queue.record([ev("s2")])

    outcome, second = asyncio.run(main())
    assert isinstance(outcome, LedgerOutcomeUnknown)
    assert second == BatchResult(1, 0)
    assert writer_pid(ledger) != stuck
    assert starts and all(name != threading.main_thread().name for name in starts)
    ledger.check()


def test_readiness_check_restarts_a_dead_writer(ledger: SQLiteProcessLedger) -> None:
    old = writer_pid(ledger)
    os.kill(old, signal.SIGKILL)
    _wait_dead(ledger)
    ledger.check()
    assert writer_pid(ledger) != old
    assert ledger.record([[ev("x")]]) == [BatchResult(1, 0)]


def test_one_writer_per_file(ledger: SQLiteProcessLedger, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="in use by another exporter"):
        SQLiteProcessLedger(tmp_path / "ledger.db", lock_wait=0.5)
    assert time.monotonic() - started >= 0.5
    # The first one still writes.
    assert ledger.record([[ev("still")]]) == [BatchResult(1, 0)]


def test_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the ledger's directory should be")
    with pytest.raises(LedgerUnavailable, match="not-a-dir"):
        SQLiteProcessLedger(blocker / "ledger.db")


_SERVER = """
import sys, time
from pathlib import Path
from llm_cost_exporter.ledger.sqlite_process import SQLiteProcessLedger
led = SQLiteProcessLedger(Path(sys.argv[1]))
print(led._proc.pid, flush=True)
time.sleep(600)
"""


def test_the_writer_leaves_when_the_server_is_killed(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(tmp_path / "ledger.db")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        writer = int(server.stdout.readline())
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{writer}").exists() and "Z" not in _state(writer):
            assert time.monotonic() < deadline, "the orphaned writer is still running"
            time.sleep(0.02)
    finally:
        server.kill()
        server.wait()
    # Its lock went with it: a new server gets the file at once.
    led = SQLiteProcessLedger(tmp_path / "ledger.db", lock_wait=5)
    try:
        assert led.record([[ev("after")]]) == [BatchResult(1, 0)]
    finally:
        led.close()
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_pipe_queue_groups_concurrent_batches_and_answers_each(
        ledger: SQLiteProcessLedger) -> None:
    queue = PipeCommitQueue(ledger)

    async def main() -> list[BatchResult]:
        return await asyncio.gather(*(queue.record([ev(f"r{i}"), ev(f"r{i}")])
                                      for i in range(8)))

    results = asyncio.run(main())
    assert results == [BatchResult(1, 1)] * 8
    # All eight were queued in one loop iteration: one commit holds them.
    assert queue.commits == 1
    assert ledger.totals().series[KEY].requests == 8


def test_pipe_queue_commits_a_cancelled_callers_batch(ledger: SQLiteProcessLedger,
                                                      tmp_path: Path) -> None:
    queue = PipeCommitQueue(ledger)

    async def main() -> BatchResult:
        gone = asyncio.ensure_future(queue.record([ev("left")]))
        await asyncio.sleep(0)  # queued and sent
        gone.cancel()
        return await queue.record([ev("stayed")])

    assert asyncio.run(main()) == BatchResult(1, 0)
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        ids = {r[0] for r in conn.execute("SELECT request_id FROM events")}
    assert ids == {"left", "stayed"}


def test_pipe_queue_close_commits_what_is_queued(ledger: SQLiteProcessLedger,
                                                 tmp_path: Path) -> None:
    queue = PipeCommitQueue(ledger)

    async def main() -> list[BatchResult]:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(queue.record([ev(f"q{i}")])) for i in range(3)]
        await asyncio.sleep(0)  # queued, not yet sent: close() finds them pending
        queue.close()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [BatchResult(1, 0)] * 3
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 3


def test_in_process_and_writer_process_store_the_same(tmp_path: Path) -> None:
    batches = [[ev("a"), ev("b", cost="0.00000001")], [ev(None, latency=None)]]
    inproc = SQLiteLedger(tmp_path / "one.db")
    inproc.record(batches)
    inproc.close()
    proc = SQLiteProcessLedger(tmp_path / "two.db")
    proc.record(batches)
    proc.close()
    query = ("SELECT request_id, ts, department, project, model, input, output, cost_usd, "
             "latency_seconds, user_name FROM events ORDER BY id")
    with sqlite3.connect(tmp_path / "one.db") as one, \
            sqlite3.connect(tmp_path / "two.db") as two:
        rows = one.execute(query).fetchall()
        assert rows == two.execute(query).fetchall()
        # 0.00000001 + 0.001 = 0.00100001 kept to the last digit
        assert rows[1][7] == "0.00100001"
        assert one.execute("SELECT * FROM totals").fetchall() == \
            two.execute("SELECT * FROM totals").fetchall()


def test_frame_reader_reads_connection_frames_and_keeps_a_bounded_buffer() -> None:
    """Frames as multiprocessing.connection writes them, read into the reused buffer; one
    larger than KEEP_BYTES gets a buffer of its own, and the EOF of the server is seen."""
    mine, theirs = socket.socketpair()
    sender = Connection(mine.detach())
    reader = FrameReader(theirs.fileno())
    theirs.close()  # the reader holds its own duplicate
    big = FrameReader.KEEP_BYTES + 1
    frames = [b"R" + bytes(range(256)) * 4, b"", os.urandom(big), b"Q"]
    writer = threading.Thread(target=lambda: [sender.send_bytes(f) for f in frames])
    writer.start()
    got = []
    for _ in frames:
        with reader.read() as frame:
            got.append(bytes(frame))
        assert len(reader._buf) <= FrameReader.KEEP_BYTES  # the big one was not kept
    writer.join()
    assert got == frames
    sender.close()
    with pytest.raises(EOFError):
        reader.read()
    reader.close()
