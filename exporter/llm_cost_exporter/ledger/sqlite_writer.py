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
- writer to server: a pickled tuple of plain values (see _reply_record, result_out and
  totals_out).
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
import socket
import struct
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
    LatencyTotals,
    LedgerRejected,
    LedgerUnavailable,
    SeriesKey,
    SeriesTotals,
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


def result_out(result: BatchResult | Exception) -> tuple[object, ...]:
    """A batch's result as it crosses the pipe: a plain tuple, (kind, ...). Plain tuples
    because pickle rebuilds a dataclass through its generic __setstate__, several times
    slower; exceptions go as (kind, message, position), since pickling them would lose
    LedgerRejected's position."""
    if isinstance(result, BatchResult):
        return ("batch", result.accepted, result.duplicates, result.written, result.replayed)
    if isinstance(result, IdempotencyConflict):
        return ("conflict", str(result), None)
    if isinstance(result, LedgerRejected):
        return ("rejected", str(result), result.position)
    if isinstance(result, LedgerUnavailable):
        return ("unavailable", str(result), None)
    return ("error", f"{type(result).__name__}: {result}", None)


def result_in(item: tuple[object, ...]) -> BatchResult | Exception:
    kind = item[0]
    if kind == "batch":
        return BatchResult(*item[1:])  # type: ignore[arg-type]
    _, message, position = item
    if kind == "conflict":
        return IdempotencyConflict(str(message))
    if kind == "rejected":
        return LedgerRejected(str(message), position)  # type: ignore[arg-type]
    if kind == "unavailable":
        return LedgerUnavailable(str(message))
    return RuntimeError(message)


# The totals a commit changed, as plain tuples for the same reason: (series key, the
# SeriesTotals fields in order) and (latency key, counts, sum, count).
TotalsRows = tuple[list[tuple[tuple[str, ...], tuple[object, ...]]],
                   list[tuple[tuple[str, str], list[int], float, int]]]


def totals_out(series: dict[SeriesKey, SeriesTotals],
               latency: dict[tuple[str, str], LatencyTotals]) -> TotalsRows:
    return ([(tuple(k), (v.requests, v.input, v.cache_read, v.cache_write, v.output,
                         v.reasoning, v.unpriced, v.cost, v.estimated))
             for k, v in series.items()],
            [(k, v.counts, v.total, v.count) for k, v in latency.items()])


def totals_in(rows: TotalsRows) -> tuple[dict[SeriesKey, SeriesTotals],
                                          dict[tuple[str, str], LatencyTotals]]:
    series, latency = rows
    return ({SeriesKey(*k): SeriesTotals(*v) for k, v in series},  # type: ignore[arg-type]
            {k: LatencyTotals(counts, total, count) for k, counts, total, count in latency})


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


class FrameReader:
    """Reads `multiprocessing.connection` frames (a 4-byte big-endian length, or -1 and an
    8-byte one, then the bytes) into one buffer that is reused.

    Connection.recv_bytes reads a frame through a BytesIO with a new bytes object per read,
    and the server's frames are 100 KB or more: 71 against 22 us of CPU per 100 KB frame
    in a loop (the writer's py-spy had it at 11% of its samples). A frame is valid until
    the next read.
    """

    # The buffer kept between frames grows up to this (a full group of MAX_EVENTS_PER_COMMIT
    # events is about 1 MB); a larger frame gets a buffer of its own, freed after it.
    KEEP_BYTES = 4 << 20

    def __init__(self, fd: int) -> None:
        # A socket of its own over a duplicate of the descriptor: the Connection keeps
        # the original, for sending and for closing.
        self._sock = socket.socket(fileno=os.dup(fd))
        self._buf = bytearray(1 << 16)

    def read(self) -> memoryview:
        """The next frame; EOFError when the other end has closed."""
        self._fill(self._buf, 4)
        (size,) = struct.unpack_from("!i", self._buf)
        if size == -1:
            self._fill(self._buf, 8)
            (size,) = struct.unpack_from("!Q", self._buf)
        buf = self._buf
        if size > len(buf):
            buf = bytearray(size)
            if size <= self.KEEP_BYTES:
                self._buf = buf
        self._fill(buf, size)
        return memoryview(buf)[:size]

    def _fill(self, buf: bytearray, end: int) -> None:
        start = 0
        with memoryview(buf) as view:
            while start < end:
                got = self._sock.recv_into(view[start:end])
                if got == 0:
                    raise EOFError("the server closed the pipe")
                start += got

    def close(self) -> None:
        self._sock.close()


def _reply_record(ledger: SQLiteLedger, frame: memoryview) -> tuple[object, ...]:
    request = _REQUEST.decode(frame[1:])
    try:
        results = ledger.record(request.batches, request.keys)
    except LedgerUnavailable as exc:
        return ("raise", "unavailable", str(exc))
    return ("ok", [result_out(r) for r in results], totals_out(*ledger.published))


def serve_requests(conn: Connection, ledger: SQLiteLedger) -> None:
    """Answer the server until it says stop or goes away."""
    frames = FrameReader(conn.fileno())
    try:
        _serve(conn, frames, ledger)
    finally:
        frames.close()


def _serve(conn: Connection, frames: FrameReader, ledger: SQLiteLedger) -> None:
    while True:
        try:
            frame = frames.read()
        except (EOFError, OSError):
            return  # the server is gone: nothing more can be acknowledged
        kind = bytes(frame[:1])
        if kind == b"Q":
            return
        try:
            if kind != b"R":
                raise ValueError(f"unknown message {kind!r}")
            reply = _reply_record(ledger, frame)
        except Exception as exc:  # a bug or a bad frame: the server learns, the writer lives
            reply = ("raise", "error", f"{type(exc).__name__}: {exc}")
        finally:
            frame.release()
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
