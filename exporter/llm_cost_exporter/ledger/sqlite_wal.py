"""SQLite connections in WAL mode, and the upkeep of the write-ahead log.

Checkpoints (copying the WAL back into the database) run in a thread of their own, off the
commit path; past WAL_LIMIT_BYTES the writer finishes one itself between two commits, so the
WAL stays bounded even when writes never pause.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

# Past this size the writer finishes the checkpoint itself between two commits (bound_wal);
# below it the background checkpointer alone keeps up.
WAL_LIMIT_BYTES = 64 * 1024 * 1024


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit BEGIN/COMMIT, so a batch is never half-written.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=10000")
    # The request_id index takes random keys: a bigger page cache keeps its hot pages.
    conn.execute("PRAGMA cache_size=-16384")
    # Checkpoints run in their own thread (see Checkpointer), not inside a commit.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    # After the WAL restarts from its beginning, the file is cut back to this size.
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
    return conn


class Checkpointer:
    """Copies the WAL back into the database every second, off the commit path.

    PASSIVE never blocks the writer or readers; it does what it can and the next round
    does the rest. Without it (autocheckpoint is off) the WAL would grow without bound.
    """

    def __init__(self, path: Path, synchronous: str, interval: float = 1.0) -> None:
        self._conn = connect(path, synchronous)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.checkpoint()

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        # A full disk or a locked file: the next round tries again.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute(f"PRAGMA wal_checkpoint({mode})")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.checkpoint("TRUNCATE")
        self._conn.close()


def bound_wal(wal: Path, writer: sqlite3.Connection) -> None:
    """Keep the WAL from growing while writes never pause.

    The WAL only starts again from its beginning when a checkpoint has copied every frame
    back. The background checkpointer runs while the writer appends, so under steady load
    it never catches up, and the WAL (with its shared-memory index, which counts in RSS)
    would grow without bound: about 4 KiB per event with random request_ids. Past the
    limit the writer (called between its commits, holding the ledger's write lock, so
    nothing is appended meanwhile) copies the rest itself; its next transaction restarts the
    WAL. The background thread has already copied most of it, so this pause is short.
    """
    try:
        size = wal.stat().st_size
    except OSError:
        return
    if size > WAL_LIMIT_BYTES:
        # BUSY (the background checkpoint is running) is fine: next commit tries again.
        with contextlib.suppress(sqlite3.Error):
            writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
