"""Group commit through the SQLite writer process, driven by the event loop itself.

While the writer commits one group, the batches that arrive queue up here; its reply (the
loop watches the pipe) answers that group's callers and sends the next group at once. No
thread waits on the pipe: a thread beside a busy loop spends its time waiting for the GIL
(see commit_queue.py), and the loop has nothing to wait for but the reply. Every caller is
answered only after the commit that holds its batch, as with CommitQueue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from llm_cost_exporter.commit_queue import count_to_take
from llm_cost_exporter.events import PricedEvent
from llm_cost_exporter.ledger import BatchKey, BatchResult

# At most this many events per commit; the rest wait for the next one (a larger batch goes
# alone). The writer holds a whole group decoded at once (about 1 KB per event), so this
# bounds its memory; 4,096 events per commit already make a commit's fixed cost small.
MAX_EVENTS_PER_COMMIT = 4096

_Pending = tuple[Sequence[PricedEvent], BatchKey | None, "asyncio.Future[BatchResult]"]


class PipedLedger(Protocol):
    def fileno(self) -> int: ...

    def send_record(self, batches: Sequence[Sequence[PricedEvent]],
                    keys: Sequence[BatchKey | None]) -> None: ...

    def take_reply(self) -> list[BatchResult | Exception]: ...


class PipeCommitQueue:
    def __init__(self, ledger: PipedLedger) -> None:
        self._ledger = ledger
        self._pending: list[_Pending] = []
        self._in_flight: list[_Pending] = []
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_scheduled = False
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
        if self._in_flight or not self._pending:
            return
        group = self._take()
        try:
            self._ledger.send_record([b for b, _, _ in group], [k for _, k, _ in group])
        except Exception as exc:  # the writer is gone: these callers learn why
            _answer(group, [exc] * len(group))
            if self._pending and self._loop is not None:
                self._loop.call_soon(self._send)
            return
        self._in_flight = group
        assert self._loop is not None
        self._fd = self._ledger.fileno()
        self._loop.add_reader(self._fd, self._on_reply)

    def _on_reply(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        self._finish()
        self._send()

    def _finish(self) -> None:
        group, self._in_flight = self._in_flight, []
        results: Sequence[BatchResult | Exception]
        try:
            results = self._ledger.take_reply()
        except Exception as exc:  # nothing of this commit is known to be written
            results = [exc] * len(group)
        else:
            self.commits += 1
        _answer(group, results)

    def close(self, timeout: float = 30) -> None:
        """Commit everything already queued (waiting for the reply on the spot)."""
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._in_flight:
            self._finish()
        while self._pending:
            self._send_now()

    def _send_now(self) -> None:
        group = self._take()
        try:
            self._ledger.send_record([b for b, _, _ in group], [k for _, k, _ in group])
        except Exception as exc:
            _answer(group, [exc] * len(group))
            return
        self._in_flight = group
        self._finish()


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
