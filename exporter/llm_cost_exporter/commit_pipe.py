"""Group commit through the SQLite writer process, driven by the event loop itself.

While the writer commits one group, the batches that arrive queue up here; its reply (the
loop watches the pipe) answers that group's callers and sends the next group at once. No
thread waits on the pipe: a thread beside a busy loop spends its time waiting for the GIL
(see commit_queue.py), and the loop has nothing to wait for but the reply. Every caller is
answered only after the commit that holds its batch, as with CommitQueue.

A writer that is gone is started again by a thread while the batches wait; one that keeps
a commit waiting REPLY_TIMEOUT is killed, and that commit's callers get a 503 saying its
outcome is unknown (a retry with the same ids is counted once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from llm_cost_exporter.commit_queue import count_to_take
from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger import BatchKey, BatchResult
from llm_cost_exporter.ledger.sqlite_process import REPLY_TIMEOUT, WriterNotReached

# At most this many events per commit; the rest wait for the next one (a larger batch goes
# alone). The writer holds a whole group decoded at once (about 1 KB per event), so this
# bounds its memory; 4,096 events per commit already make a commit's fixed cost small.
MAX_EVENTS_PER_COMMIT = 4096

_Pending = tuple[Sequence[PricedEvent], BatchKey | None, "asyncio.Future[BatchResult]"]


class PipedLedger(Protocol):
    def fileno(self) -> int: ...

    def writer_alive(self) -> bool: ...

    def start_writer(self) -> None: ...

    def kill_writer(self) -> None: ...

    def send_record(self, batches: Sequence[Sequence[PricedEvent]],
                    keys: Sequence[BatchKey | None]) -> None: ...

    def take_reply(self) -> list[BatchResult | Exception]: ...


class PipeCommitQueue:
    def __init__(self, ledger: PipedLedger, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self._ledger = ledger
        self._reply_timeout = reply_timeout
        self._pending: list[_Pending] = []
        self._in_flight: list[_Pending] = []
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_scheduled = False
        self._starting = False  # a thread is starting a new writer
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent = 0  # groups in a row that found the writer gone
        self.commits = 0

    async def record(self, batch: Sequence[PricedEvent], key: BatchKey | None = None
                     ) -> BatchResult:
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        self._pending.append((batch, key, future))
        if not self._in_flight and not self._send_scheduled:
            # After this loop iteration: batches parsed in the same iteration go together.
            self._send_scheduled = True
            loop.call_soon(self._send)
        return await future

    def _take(self) -> list[_Pending]:
        taken = count_to_take(self._pending, MAX_EVENTS_PER_COMMIT)
        group, self._pending = self._pending[:taken], self._pending[taken:]
        return group

    def _send(self) -> None:
        self._send_scheduled = False
        if self._in_flight or self._starting or not self._pending:
            return
        loop = self._loop
        assert loop is not None
        if not self._ledger.writer_alive():
            # Started in a thread: a spawn and a lock wait must not stall the loop. The
            # batches wait in the queue meanwhile.
            self._starting = True
            loop.run_in_executor(None, self._ledger.start_writer).add_done_callback(
                self._started)
            return
        group = self._take()
        try:
            _send_group(self._ledger, group)
        except WriterNotReached as exc:
            # Nothing of it reached the writer: send it again to the next one, unless
            # writers keep dying before they can take anything.
            self._unsent += 1
            if self._unsent > 2:
                _answer(group, [exc] * len(group))
            else:
                self._pending[:0] = group
            loop.call_soon(self._send)
            return
        except Exception as exc:
            _answer(group, [exc] * len(group))
            loop.call_soon(self._send)
            return
        self._in_flight = group
        self._fd = self._ledger.fileno()
        loop.add_reader(self._fd, self._on_reply)
        self._watchdog = loop.call_later(self._reply_timeout, self._ledger.kill_writer)

    def _started(self, done: asyncio.Future[None]) -> None:
        self._starting = False
        exc = done.exception()
        if exc is not None:  # no writer: everyone waiting learns why
            waiting, self._pending = self._pending, []
            _answer(waiting, [exc] * len(waiting))
        self._send()

    def _on_reply(self) -> None:
        self._stop_watching()
        self._finish()
        self._send()

    def _stop_watching(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _finish(self) -> None:
        group, self._in_flight = self._in_flight, []
        results: Sequence[BatchResult | Exception]
        try:
            results = self._ledger.take_reply()
        except Exception as exc:  # LedgerOutcomeUnknown when the writer died meanwhile
            results = [exc] * len(group)
        else:
            self.commits += 1
            self._unsent = 0
        _answer(group, results)

    def close(self, timeout: float = 30) -> None:
        """Commit everything already queued (waiting for the replies on the spot)."""
        self._stop_watching()
        if self._in_flight:
            self._finish()
        while self._pending:
            group = self._take()
            try:
                if not self._ledger.writer_alive():
                    self._ledger.start_writer()
                _send_group(self._ledger, group)
            except Exception as exc:
                _answer(group, [exc] * len(group))
                continue
            self._in_flight = group
            self._finish()


def _send_group(ledger: PipedLedger, group: Sequence[_Pending]) -> None:
    ledger.send_record([batch for batch, _, _ in group], [key for _, key, _ in group])


def _answer(group: Sequence[_Pending], results: Sequence[BatchResult | Exception]) -> None:
    # A caller that went away (cancelled) gets no answer; its batch is committed all the
    # same, as with CommitQueue.
    for (_, _, future), result in zip(group, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
