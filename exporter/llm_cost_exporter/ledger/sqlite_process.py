"""The SQLite ledger as `serve` runs it: writes in a writer process, reads in this one.

Committing is about 40% of an ingested event's CPU (bench/ingest_throughput.py --profile).
In one process it runs on the same core as parsing and pricing, and a thread does not help:
the GIL lets only one of them run Python at a time (measured: batches got slower through a
writer thread). A process of its own (sqlite_writer.py) commits on the second core while the
event loop parses the next requests. Callers are answered only after the writer's reply, so
an acknowledged event is committed, as before.

This side keeps what the server reads without waiting: a read connection for Idempotency-Key
lookups and budget spend, and a copy of the committed running totals, updated from each
commit's reply (the writer sends the totals that commit changed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path

import llm_cost_exporter
from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger.base import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LedgerUnavailable,
    Totals,
    label_values,
)
from llm_cost_exporter.ledger.sqlite import load_totals, read_spend, stored_key, write_health
from llm_cost_exporter.ledger.sqlite_wal import connect
from llm_cost_exporter.ledger.sqlite_writer import LOCK_WAIT_SECONDS, encode_record, result_in

log = logging.getLogger("llm_cost_exporter")


class SQLiteProcessLedger:
    # Commits wait on another process: PipeCommitQueue has the loop watch the pipe for the
    # reply (commit_pipe.py), so the loop itself never waits on it.
    cheap_commits = False
    # Reads are local SQLite reads of microseconds: fine on the event loop.
    cheap_reads = True

    def __init__(self, path: Path, synchronous: str = "NORMAL",
                 start_timeout: float = 120.0, lock_wait: float = LOCK_WAIT_SECONDS) -> None:
        self.path = path
        self._lock_wait = lock_wait
        self._synchronous = synchronous
        self._start_timeout = start_timeout
        # One request and its reply at a time on the pipe (commits and /readyz checks).
        self._call_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._totals_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._awaiting_reply = False  # a group was sent and its reply not yet taken
        self.schema_version = self._start()
        try:
            self._reader = connect(path, synchronous)
            # The writer holds the lock and commits nothing until asked: a consistent read.
            self._totals = load_totals(self._reader)
        except Exception as exc:
            self.close()
            raise LedgerUnavailable(f"cannot open ledger {path}: {exc}") from exc

    # -- the writer process -------------------------------------------------------------
    def _start(self) -> int:
        """Spawn the writer; wait until it holds the ledger; return the schema version."""
        mine, theirs = socket.socketpair()
        package_root = str(Path(llm_cost_exporter.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "llm_cost_exporter.ledger.sqlite_writer",
                 "--fd", str(theirs.fileno()), "--path", str(self.path),
                 "--synchronous", self._synchronous, "--lock-wait", str(self._lock_wait),
                 "--log-level", logging.getLevelName(logging.getLogger().level)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        try:
            if not self._conn.poll(self._start_timeout):
                raise LedgerUnavailable(f"ledger writer did not start within "
                                        f"{self._start_timeout:.0f} s")
            reply = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self._stop_writer(0)
            raise LedgerUnavailable(f"ledger writer exited at start ({exc!r})") from exc
        except LedgerUnavailable:
            self._stop_writer(0)
            raise
        if reply[0] != "ready":
            self._stop_writer(5)
            raise LedgerUnavailable(reply[1])
        return int(reply[1])

    def _exchange(self, frame: bytes) -> None:
        with self._call_lock:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            if self._conn is None:  # the last writer died: start another
                self._restart()
            assert self._conn is not None
            try:
                _blocking(self._conn)
                self._conn.send_bytes(frame)
            except OSError as exc:
                raise self._writer_gone() from exc
            self._awaiting_reply = True

    def _reply(self) -> tuple[object, ...]:
        with self._call_lock:
            if self._conn is None or not self._awaiting_reply:
                raise LedgerUnavailable("ledger writer process is not running")
            self._awaiting_reply = False
            try:
                _blocking(self._conn)
                reply: tuple[object, ...] = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as exc:
                raise self._writer_gone() from exc
        if reply[0] == "raise":
            raise (LedgerUnavailable(str(reply[2])) if reply[1] == "unavailable"
                   else RuntimeError(f"ledger writer: {reply[2]}"))
        return reply

    def _writer_gone(self) -> LedgerUnavailable:
        code = self._stop_writer(0)
        # Its last commit may have landed unreported: the next start re-reads the totals.
        return LedgerUnavailable(f"ledger writer process exited (code {code}); the next "
                                 "write starts a new one")

    def _restart(self) -> None:
        log.error("ledger writer process is gone; starting a new one")
        self._start()
        with self._read_lock:
            totals = load_totals(self._reader)
        with self._totals_lock:
            self._totals = totals

    def _stop_writer(self, timeout: float) -> int | None:
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            conn.close()  # the writer reads EOF and exits after its current commit
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    # -- writes ---------------------------------------------------------------------------
    # PipeCommitQueue sends a group, watches fileno() and takes the reply when it is there;
    # record() does both in one call. One group at a time is on the pipe.
    def fileno(self) -> int:
        if self._conn is None:
            raise LedgerUnavailable("ledger writer process is not running")
        return self._conn.fileno()

    def send_record(self, batches: Sequence[Sequence[PricedEvent]],
                    keys: Sequence[BatchKey | None]) -> None:
        self._exchange(encode_record(batches, keys))

    def take_reply(self) -> list[BatchResult | Exception]:
        _, results, series, latency = self._reply()
        # Published only now, after the commit: a scrape never sees uncommitted totals.
        # Values are replaced, never changed, as in SQLiteLedger.
        with self._totals_lock:
            self._totals.series.update(series)  # type: ignore[arg-type]
            self._totals.latency.update(latency)  # type: ignore[arg-type]
        return [result_in(r) for r in results]  # type: ignore[attr-defined]

    def record(self, batches: Sequence[Sequence[PricedEvent]],
               keys: Sequence[BatchKey | None] | None = None) -> list[BatchResult | Exception]:
        self.send_record(batches, keys or [None] * len(batches))
        return self.take_reply()

    def check(self) -> None:
        """The writer runs (a dead one is started again), and the file takes a write now."""
        with self._call_lock:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            # A group on its way to a dead writer learns of it from the pipe (EOF) first.
            dead = self._proc is None or self._proc.poll() is not None
            if dead and not self._awaiting_reply:
                if self._conn is not None:
                    self._writer_gone()
                self._restart()
            if dead and self._awaiting_reply:
                raise LedgerUnavailable("ledger writer process exited")
        with self._read_lock:
            write_health(self._reader)

    # -- reads ----------------------------------------------------------------------------
    def totals(self) -> Totals:
        with self._totals_lock:
            return Totals(series=dict(self._totals.series), latency=dict(self._totals.latency))

    def lookup_key(self, key: BatchKey) -> BatchResult | IdempotencyConflict | None:
        with self._read_lock:
            try:
                return stored_key(self._reader, key)
            except Exception as exc:
                raise LedgerUnavailable(f"ledger not readable: {exc}") from exc

    def spend(self, department: str, project: str | None, start: datetime,
              end: datetime) -> Decimal:
        with self._read_lock:
            return read_spend(self._reader, department, project, start, end)

    def label_values(self) -> dict[str, set[str]]:
        with self._totals_lock:
            return label_values(list(self._totals.series))

    def close(self, timeout: float = 60.0) -> None:
        """Stop the writer after the commit it is running (it checkpoints and exits)."""
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send_bytes(b"Q")
            self._stop_writer(timeout)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            with self._read_lock:
                reader.close()


def _blocking(conn: Connection) -> None:
    # uvloop (libuv) makes an fd it watches non-blocking, and a frame larger than the socket
    # buffer then fails half-sent. The loop watches only between send and reply, so each
    # exchange puts the fd back in blocking mode first.
    os.set_blocking(conn.fileno(), True)
