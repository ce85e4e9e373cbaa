"""Group commit: many concurrent requests share one ledger transaction.

Requests hand their batch to a single writer thread and wait; the thread takes everything
that queued up while the previous commit ran and commits it together. Every caller is
answered only after the commit that holds its batch, so an acknowledged event is durable.

With `inline=True` batches of up to INLINE_MAX_EVENTS (a proxied call, a single ingested
event, a reporter's or an SDK's batch of a hundred) skip the thread: those submitted during
one event-loop iteration are committed together (up to INLINE_MAX_FLUSH_EVENTS per commit)
by a callback on the loop itself. That is right when a commit is cheap (SQLite WAL with
synchronous=NORMAL does not fsync on commit). It was cheaper than the thread even for
100-event batches: sqlite3 lets go of the GIL around each statement it steps, so a writer
thread beside a busy event loop spent much of its time waiting to get the GIL back
(bench/ingest_throughput.py, 100-event batches: 38.7 us of CPU per event through the
thread, 29.8 us inline). Larger batches still go to the writer thread, so that one
10,000-event batch does not stall the loop (and every proxied call on it) for the ~60 ms
its commit takes. A ledger whose commits wait on the disk or the network keeps the thread
for everything, so the loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger import BatchKey, BatchResult, Ledger

_STOP = object()
# Batches up to this size are committed on the event loop when inline mode is on: a commit
# of this many events holds the loop for about 2 ms.
INLINE_MAX_EVENTS = 256
# Batches that queued up together are committed together, up to this many events per
# commit on the loop (about 8 ms); the rest follow in the next loop iterations.
INLINE_MAX_FLUSH_EVENTS = 1024


def count_to_take(pending: Sequence[tuple[Sequence[PricedEvent], Any, Any]],
                  max_events: int) -> int:
    """How many queued batches, from the first, one commit takes: up to max_events events,
    and always one batch at least."""
    taken = size = 0
    for batch, _, _ in pending:
        if taken and size + len(batch) > max_events:
            break
        taken += 1
        size += len(batch)
    return taken


class CommitQueue:
    def __init__(self, ledger: Ledger, max_events_per_commit: int = 20_000,
                 inline: bool = False) -> None:
        self._ledger = ledger
        self._inline = inline
        self._pending: list[tuple[Sequence[PricedEvent], BatchKey | None,
                                  asyncio.Future[BatchResult]]] = []
        self._flush_scheduled = False
        self._max_events = max_events_per_commit
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self.commits = 0

    def submit(self, batch: Sequence[PricedEvent], key: BatchKey | None = None
               ) -> Future[BatchResult]:
        future: Future[BatchResult] = Future()
        self._queue.put((batch, key, future))
        return future

    async def record(self, batch: Sequence[PricedEvent], key: BatchKey | None = None
                     ) -> BatchResult:
        if not self._inline or len(batch) > INLINE_MAX_EVENTS:
            return await asyncio.wrap_future(self.submit(batch, key))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        self._pending.append((batch, key, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_inline)
        return await future

    def _flush_inline(self) -> None:
        # At most INLINE_MAX_FLUSH_EVENTS per callback (always one batch at least): a burst
        # of many clients is committed in several steps, with the loop serving sockets and
        # proxied calls between them, instead of in one long stall.
        pending = self._take_inline()
        if self._pending:
            asyncio.get_running_loop().call_soon(self._flush_inline)
        else:
            self._flush_scheduled = False
        if pending:  # close() may have committed them already
            self._commit_inline(pending)

    def _take_inline(self) -> list[tuple[Sequence[PricedEvent], BatchKey | None,
                                         asyncio.Future[BatchResult]]]:
        taken = count_to_take(self._pending, INLINE_MAX_FLUSH_EVENTS)
        pending, self._pending = self._pending[:taken], self._pending[taken:]
        return pending

    def _commit_inline(self, pending: list[tuple[Sequence[PricedEvent], BatchKey | None,
                                                 asyncio.Future[BatchResult]]]) -> None:
        # Nothing runs on the loop while the ledger commits, so a caller not cancelled now
        # is still waiting when its answer is set.
        self._commit_and_answer(pending, [not future.done() for _, _, future in pending])

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            pending = [item]
            size = len(item[0])  # type: ignore[index]
            stop = False
            while size < self._max_events:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                pending.append(more)
                size += len(more[0])  # type: ignore[index]
            self._commit(pending)  # type: ignore[arg-type]
            if stop:
                return

    def _commit(self, pending: list[tuple[Sequence[PricedEvent], BatchKey | None,
                                          Future[BatchResult]]]) -> None:
        # Mark every waiter running: from now on it can no longer be cancelled, so setting
        # its result cannot fail. Setting the result of a cancelled future used to raise here
        # and kill this thread, and every later batch for the thread then waited forever.
        self._commit_and_answer(
            pending, [future.set_running_or_notify_cancel() for _, _, future in pending])

    def _commit_and_answer(self, pending: Sequence[tuple[Sequence[PricedEvent],
                                                         BatchKey | None, Any]],
                           waiting: list[bool]) -> None:
        """Commit the batches together and answer the callers still waiting. A caller that
        was cancelled (its request went away) gets no answer, but its batch is committed all
        the same (Recorder.commit counts a cancelled batch as written)."""
        results: Sequence[BatchResult | Exception]
        try:
            results = self._ledger.record([batch for batch, _, _ in pending],
                                          [key for _, key, _ in pending])
        except Exception as exc:  # the whole commit failed: every waiter learns why
            results = [exc] * len(pending)
        else:
            self.commits += 1
        for (_, _, future), live, result in zip(pending, waiting, results, strict=True):
            if not live:
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def close(self, timeout: float = 30) -> None:
        """Commit everything already queued, then stop the writer."""
        # Inline batches a shutdown caught between two flush steps: committed here, so that
        # nothing queued is left behind (and no flag of a stopped loop stays set).
        while self._pending:
            self._commit_inline(self._take_inline())
        self._flush_scheduled = False
        self._queue.put(_STOP)
        self._thread.join(timeout)
