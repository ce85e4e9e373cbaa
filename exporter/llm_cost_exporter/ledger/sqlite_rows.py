"""Insert many rows with few statements: multi-row VALUES instead of executemany.

executemany steps one row at a time, and sqlite3 lets go of the GIL around every step: with
an event loop busy beside it, the writer then waits for the GIL once per row. One statement
of 64 rows is bound once and stepped once, so SQLite inserts all 64 in one stretch without
the GIL (on the other core when a thread commits) and the per-row statement overhead goes
(bench/ingest_stages.py: about 15% less time per row than executemany for the events row).
Upserts take the same statements with their ON CONFLICT clause after the rows: SQLite applies
the rows of one statement in order, so a key twice in one statement is updated twice, as
two statements would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

# Statement sizes, largest first: any count is a sum of these (binary), so only seven
# statement shapes per table live in sqlite3's statement cache (128 by default).
_SIZES = (64, 32, 16, 8, 4, 2, 1)


class RowInserter:
    """`INSERT INTO table (columns) VALUES (...), (...) [tail]` for rows given flat; `tail`
    is an optional ON CONFLICT clause."""

    def __init__(self, head: str, columns: int, tail: str = "") -> None:
        self.columns = columns
        group = "(" + ",".join("?" * columns) + ")"
        self._sql = {size: f"{head} VALUES {','.join([group] * size)} {tail}"
                     for size in _SIZES}

    def insert(self, conn: sqlite3.Connection, flat: Sequence[object]) -> None:
        """Insert len(flat) / columns rows; `flat` holds their values one row after another."""
        width = self.columns
        rows, rest = divmod(len(flat), width)
        if rest:
            raise ValueError(f"{len(flat)} values do not make rows of {width}")
        # 64 rows x 24 columns = 1,536 parameters: fine since SQLite 3.32 (32,766), too many
        # for an older library (999), where the statements stay under its own limit.
        most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
        if rows and most < 1:  # not one row fits: refuse loudly, as SQLite itself would
            raise sqlite3.OperationalError("too many SQL variables for one row")
        start = 0
        for size in _SIZES:
            if size > most:
                continue
            while rows >= size:
                end = start + size * width
                conn.execute(self._sql[size], flat[start:end])
                start, rows = end, rows - size
