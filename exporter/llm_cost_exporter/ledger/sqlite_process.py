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
import sqlite3
import subprocess
import sys
import threading
import time
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
    LedgerOutcomeUnknown,
    LedgerUnavailable,
    Totals,
    label_values,
)
from llm_cost_exporter.ledger.sqlite_queries import (
    load_totals,
    read_spend,
    stored_key,
    write_health,
)
from llm_cost_exporter.ledger.sqlite_wal import connect
from llm_cost_exporter.ledger.sqlite_writer import (
    LOCK_WAIT_SECONDS,
    encode_record,
    result_in,
    totals_in,
)

log = logging.getLogger("llm_cost_exporter")

# A replacement writer waits this long for the file's lock (its dead predecessor's is free at
# once; another exporter's is not, and then it is better to fail fast) and to be ready.
RESTART_LOCK_WAIT = 5.0
RESTART_TIMEOUT = 60.0
# /readyz fails while a commit has waited this long for the writer's answer (a stuck or
# stopped writer); PipeCommitQueue kills a writer that keeps one waiting REPLY_TIMEOUT.
STALL_SECONDS = 15.0
REPLY_TIMEOUT = 60.0


class SQLiteProcessLedger:
    # Commits wait on another process: PipeCommitQueue has the loop watch the pipe for the
    # reply (commit_pipe.py), so the loop itself never waits on it.
    cheap_commits = False
    # Reads are local SQLite reads of microseconds: fine on the event loop.
    cheap_reads = True

    def __init__(self, path: Path, synchronous: str = "NORMAL",
                 start_timeout: float | None = None,
                 lock_wait: float = LOCK_WAIT_SECONDS) -> None:
        """start_timeout: None waits as long as the first writer needs (it may be upgrading
        the schema; it exits by itself when it cannot start)."""
        self.path = path
        self._synchronous = synchronous
        # Brief sections only: swapping the writer, one send, one reply. The event loop
        # takes this lock, so nothing slow ever runs under it.
        self._call_lock = threading.Lock()
        # Starting a writer is slow (a spawn, its lock, its totals): threads serialize on
        # this one, never the event loop.
        self._start_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._totals_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._closed = False
        self._awaiting_reply = False  # a group was sent and its reply not yet taken
        self._sent_at = 0.0
        self._reader: sqlite3.Connection | None = None
        self._health: sqlite3.Connection | None = None
        proc, conn, self.schema_version = self._spawn(start_timeout, lock_wait)
        try:
            self._reader = connect(path, synchronous)
            self._health = connect(path, synchronous)
            # The writer holds the lock and commits nothing until asked: a consistent read.
            self._totals = load_totals(self._reader)
        except Exception as exc:
            _discard(conn, proc)
            self.close()
            raise LedgerUnavailable(f"cannot open ledger {path}: {exc}") from exc
        self._proc, self._conn = proc, conn

    # -- the writer process -------------------------------------------------------------
    def _spawn(self, timeout: float | None, lock_wait: float
               ) -> tuple[subprocess.Popen[bytes], Connection, int]:
        """Start a writer and wait until it holds the ledger: (process, pipe, schema)."""
        mine, theirs = socket.socketpair()
        package_root = str(Path(llm_cost_exporter.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llm_cost_exporter.ledger.sqlite_writer",
                 "--fd", str(theirs.fileno()), "--path", str(self.path),
                 "--synchronous", self._synchronous, "--lock-wait", str(lock_wait),
                 "--log-level", logging.getLevelName(logging.getLogger().level)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        conn = Connection(mine.detach())
        try:
            if not conn.poll(timeout):
                raise LedgerUnavailable(f"ledger writer did not start within {timeout:g} s")
            reply = pickle.loads(conn.recv_bytes())
            if reply[0] != "ready":
                raise LedgerUnavailable(reply[1])
        except (EOFError, OSError) as exc:
            _discard(conn, proc)
            raise LedgerUnavailable(f"ledger writer exited at start ({exc!r})") from exc
        except BaseException:
            _discard(conn, proc)
            raise
        return proc, conn, int(reply[1])

    def writer_alive(self) -> bool:
        proc = self._proc
        return self._conn is not None and proc is not None and proc.poll() is None

    def start_writer(self) -> None:
        """Start a new writer if the last one is gone. Blocks (a spawn, a lock wait): call
        it from a thread, never from the event loop."""
        with self._start_lock:
            with self._call_lock:
                if self._closed:
                    raise LedgerUnavailable("ledger is closed")
                if self.writer_alive():
                    return
                if self._awaiting_reply:  # the loop is about to read its EOF: not yet
                    raise LedgerUnavailable("ledger writer process exited")
                conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
            if conn is not None or proc is not None:
                _discard(conn, proc)
            log.error("ledger writer process is gone; starting a new one")
            new_proc, new_conn, _ = self._spawn(RESTART_TIMEOUT, RESTART_LOCK_WAIT)
            try:
                # Read before the new writer is put to work: its last commit may have
                # landed unreported, and none can land while it waits to be asked.
                with self._read_lock:
                    assert self._reader is not None
                    totals = load_totals(self._reader)
            except Exception as exc:
                _discard(new_conn, new_proc)
                raise LedgerUnavailable(f"ledger not readable: {exc}") from exc
            with self._totals_lock:
                self._totals = totals
            with self._call_lock:
                self._proc, self._conn = new_proc, new_conn

    def kill_writer(self) -> None:
        """Kill a writer that stopped answering; the pipe's EOF then answers its callers."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.error("ledger writer process did not answer in time; killing it")
            proc.kill()

    def _exchange(self, frame: bytes) -> None:
        with self._call_lock:
            if self._closed:
                raise LedgerUnavailable("ledger is closed")
            conn = self._conn
            if conn is None or not self.writer_alive():
                raise WriterNotReached("ledger writer process is not running")
            try:
                _blocking(conn)
                conn.send_bytes(frame)
            except OSError as exc:
                self._drop_writer()
                raise WriterNotReached(f"ledger writer process is gone ({exc!r})") from exc
            self._awaiting_reply = True
            self._sent_at = time.monotonic()

    def _reply(self) -> tuple[object, ...]:
        with self._call_lock:
            conn = self._conn
            if conn is None or not self._awaiting_reply:
                raise LedgerUnavailable("ledger writer process is not running")
            self._awaiting_reply = False
            try:
                _blocking(conn)
                reply: tuple[object, ...] = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError) as exc:
                code = self._drop_writer()
                raise LedgerOutcomeUnknown(
                    f"ledger writer process exited (code {code}) before confirming the "
                    "commit; a new one starts with the next write") from exc
        if reply[0] == "raise":
            raise (LedgerUnavailable(str(reply[2])) if reply[1] == "unavailable"
                   else RuntimeError(f"ledger writer: {reply[2]}"))
        return reply

    def _drop_writer(self) -> int | None:
        """Forget a writer that is gone (called under _call_lock); its exit code."""
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        return _discard(conn, proc, wait=1.0)

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
        _, results, rows = self._reply()
        series, latency = totals_in(rows)  # type: ignore[arg-type]
        # Published only now, after the commit: a scrape never sees uncommitted totals.
        # Values are replaced, never changed, as in SQLiteLedger.
        with self._totals_lock:
            self._totals.series.update(series)
            self._totals.latency.update(latency)
        return [result_in(r) for r in results]  # type: ignore[attr-defined]

    def record(self, batches: Sequence[Sequence[PricedEvent]],
               keys: Sequence[BatchKey | None] | None = None) -> list[BatchResult | Exception]:
        if not self.writer_alive():
            self.start_writer()
        self.send_record(batches, keys or [None] * len(batches))
        return self.take_reply()

    def check(self) -> None:
        """Ready: the writer runs (a dead one is started again, here in the caller's
        thread), has not kept a commit waiting for STALL_SECONDS, and the file takes a
        write now (the readiness row, from this process: a full disk or a read-only file
        shows)."""
        if self._awaiting_reply and time.monotonic() - self._sent_at > STALL_SECONDS:
            raise LedgerUnavailable(f"ledger writer has not answered a commit for "
                                    f"{time.monotonic() - self._sent_at:.0f} s")
        if not self.writer_alive():
            self.start_writer()
        with self._health_lock:
            if self._health is None:
                raise LedgerUnavailable("ledger is closed")
            write_health(self._health)

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
        with self._start_lock, self._call_lock:
            if self._closed:
                return
            self._closed = True
            conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send_bytes(b"Q")
            _discard(conn, proc, wait=timeout)
        with self._read_lock, self._health_lock:
            for db in (self._reader, self._health):
                if db is not None:
                    db.close()
            self._reader = self._health = None

class WriterNotReached(LedgerUnavailable):
    """Nothing of the group reached the writer (it was gone): safe to send again."""


def _discard(conn: Connection | None, proc: subprocess.Popen[bytes] | None,
             wait: float = 0.0) -> int | None:
    """Close our end (the writer reads EOF and exits after its current commit) and reap
    the process, killing it if it has not left within `wait` seconds."""
    if conn is not None:
        conn.close()
    if proc is None:
        return None
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _blocking(conn: Connection) -> None:
    # uvloop (libuv) makes an fd it watches non-blocking, and a frame larger than the socket
    # buffer then fails half-sent. The loop watches only between send and reply, so each
    # exchange puts the fd back in blocking mode first.
    os.set_blocking(conn.fileno(), True)
