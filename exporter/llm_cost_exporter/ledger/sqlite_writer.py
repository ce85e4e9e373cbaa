"""The SQLite ledger's writer process, and the messages it exchanges with the server.

`serve` runs the ledger's writes here, in a process of its own (see sqlite_process.py): the
server's event loop parses, prices and answers while this process inserts and commits, so
the two use both cores instead of one. It is a plain `SQLiteLedger`: the same code, the same
transactions, the same running totals. It is the only writer of its file while it lives: it
holds an flock on the ledger file (not one of SQLite's own locks), so a restarted exporter
waits for a predecessor's writer to finish its last commit before it reads the totals.

Messages go over a socketpair as `multiprocessing.connection` frames:
- server to writer: b"R" + msgpack(RecordRequest), or b"Q" (commit nothing more, close
  the ledger, exit);
- writer to server: a pickled tuple (see _reply_record and sqlite_process.py).
The writer leaves when the server's end closes (the server was killed): whatever commit is
running finishes first, and nothing uncommitted was ever acknowledged.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import pickle
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger.base import (
    BatchKey,
    BatchResult,
    IdempotencyConflict,
    LedgerRejected,
    LedgerUnavailable,
)
from llm_cost_exporter.ledger.sqlite import SQLiteLedger
from llm_cost_exporter.logs import setup_logging

# How long a new writer waits for the lock a predecessor's writer still holds (it finishes
# one commit and a checkpoint, then exits).
LOCK_WAIT_SECONDS = 30.0


class RecordRequest(msgspec.Struct, array_like=True, gc=False):
    batches: list[list[PricedEvent]]
    keys: list[BatchKey | None]


ENCODER = msgspec.msgpack.Encoder()
_REQUEST = msgspec.msgpack.Decoder(RecordRequest)


def encode_record(batches: Sequence[Sequence[PricedEvent]],
                  keys: Sequence[BatchKey | None]) -> bytes:
    return b"R" + ENCODER.encode(RecordRequest(list(map(list, batches)), list(keys)))


def result_out(result: BatchResult | Exception) -> object:
    """A batch's result as it crosses the pipe. Exceptions go as (kind, message, position):
    pickling them would lose LedgerRejected's position."""
    if isinstance(result, BatchResult):
        return result
    if isinstance(result, IdempotencyConflict):
        return ("conflict", str(result), None)
    if isinstance(result, LedgerRejected):
        return ("rejected", str(result), result.position)
    if isinstance(result, LedgerUnavailable):
        return ("unavailable", str(result), None)
    return ("error", f"{type(result).__name__}: {result}", None)


def result_in(item: object) -> BatchResult | Exception:
    if isinstance(item, BatchResult):
        return item
    kind, message, position = item  # type: ignore[misc]
    if kind == "conflict":
        return IdempotencyConflict(message)
    if kind == "rejected":
        return LedgerRejected(message, position)
    if kind == "unavailable":
        return LedgerUnavailable(message)
    return RuntimeError(message)


def lock_ledger(path: Path, wait: float = LOCK_WAIT_SECONDS) -> int:
    """Take the writer's lock on the ledger file; returns the fd that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, and works on a file the ledger may not write to (the
    # ledger then says why it cannot take writes). An empty new file is an empty database.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise LedgerUnavailable(
                    f"ledger {path} is in use by another exporter's writer (waited "
                    f"{wait:.0f} s): one exporter per SQLite file") from None
            time.sleep(0.05)


def _reply_record(ledger: SQLiteLedger, frame: bytes) -> tuple[object, ...]:
    request = _REQUEST.decode(memoryview(frame)[1:])
    try:
        results = ledger.record(request.batches, request.keys)
    except LedgerUnavailable as exc:
        return ("raise", "unavailable", str(exc))
    series, latency = ledger.published
    return ("ok", [result_out(r) for r in results], series, latency)


def serve_requests(conn: Connection, ledger: SQLiteLedger) -> None:
    """Answer the server until it says stop or goes away."""
    while True:
        try:
            frame = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the server is gone: nothing more can be acknowledged
        kind = frame[:1]
        if kind == b"Q":
            return
        try:
            if kind != b"R":
                raise ValueError(f"unknown message {kind!r}")
            reply = _reply_record(ledger, frame)
        except Exception as exc:  # a bug or a bad frame: the server learns, the writer lives
            reply = ("raise", "error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send_bytes(pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--lock-wait", type=float, default=LOCK_WAIT_SECONDS)
    args = parser.parse_args(argv)
    # Signals are the server's to handle: it stops this process with b"Q" once its own
    # requests are done (a Ctrl-C reaches the whole process group).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(args.log_level)
    conn = Connection(args.fd)
    try:
        lock = lock_ledger(args.path, args.lock_wait)
        ledger = SQLiteLedger(args.path, args.synchronous)
    except (LedgerUnavailable, OSError) as exc:
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(("failed", str(exc))))
        return 1
    # As serve does: what start-up built lives as long as the process, and the collector
    # need not walk it again.
    gc.collect()
    gc.freeze()
    try:
        conn.send_bytes(pickle.dumps(("ready", ledger.schema_version)))
        serve_requests(conn, ledger)
    except OSError:
        pass
    finally:
        ledger.close()
        os.close(lock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
