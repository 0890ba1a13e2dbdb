"""Group commit: concurrent commands of one process share transactions.

Every save goes behind the events table's lock, so a hundred callers that each start one saga
wait on each other a hundred times. Here, while one transaction is in flight, the calls that
arrive queue up; when it ends, the first of them leads the next transaction for all of them.
A lone call commits at once (it leads its own); a burst shares one lock and one commit.

Each call returns only once its own events are durable, and gets its own answer: if the shared
transaction fails (one saga's events conflict, a start repeats an id already taken, even in the
same batch), each call of the batch is written again on its own, so the conflict reaches only
its caller and its neighbours are saved as if they had been alone.

Async callers (``save_async``, the HTTP API's) queue in the same line without a thread of
their own: when one must lead, the transaction runs in the group's one writer thread, and
each is answered on its event loop; a batch may mix both kinds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import IntegrityError

Write = Callable[[list[Any]], None]
"""Saves the aggregates of one or more calls in one transaction (raises if any cannot be)."""


@dataclass(eq=False)
class Call:
    """One caller's aggregates, and what became of them."""

    aggregates: list[Any]
    ready: threading.Event = field(default_factory=threading.Event)
    """Set when the call is done, or (``done`` still false) when it must lead the next transaction."""
    done: bool = False
    error: BaseException | None = None
    answer: Callable[[], None] | None = None
    """An async call's way to be told it is done or must lead (from the writing thread); a thread's
    call is told through ``ready``."""

    def wake(self) -> None:
        if self.answer is None:
            self.ready.set()
        else:
            self.answer()


class GroupCommit:
    """Queues concurrent saves and writes them together (see the module's notes)."""

    def __init__(self, write: Write, max_batch: int = 500) -> None:
        self.write = write
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[Call] = []
        self._busy = False
        self.batches = 0
        """Transactions written (a call that had to be written alone again counts too)."""
        self._writer: ThreadPoolExecutor | None = None
        """Where batches led by an async call are written (made on first use)."""

    def save(self, aggregates: list[Any]) -> None:
        """Write ``aggregates`` (with the calls that queue meanwhile); return once durable, or raise
        this call's own error."""
        call = Call(aggregates)
        if not self._enqueue(call):
            call.ready.wait()
        if not call.done:  # leading: write what has queued, this call first
            self._lead()
        if call.error is not None:
            raise call.error

    async def save_async(self, aggregates: list[Any]) -> None:
        """``save`` for a coroutine: queue ``aggregates`` without blocking the event loop and return
        once they are durable (raising this call's own error). Cancelling the awaiting task does not
        take the call back: it is written with its batch, as a thread's call would be."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        call = Call(aggregates)

        def answer() -> None:  # in the writing thread: done, or this call's turn to lead
            if call.done:
                with suppress(RuntimeError):  # the loop has closed: nobody awaits the answer any more
                    loop.call_soon_threadsafe(_settle, answered)
            else:
                self._write_in_thread()

        call.answer = answer
        if self._enqueue(call):
            self._write_in_thread()
        await asyncio.shield(answered)
        if call.error is not None:
            raise call.error

    def _enqueue(self, call: Call) -> bool:
        """Queue ``call``; whether it leads (no transaction was in flight)."""
        with self._lock:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
        return lead

    def _write_in_thread(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
            writer = self._writer
        writer.submit(self._lead)

    def close(self) -> None:
        """Stop the writer thread once its batches are written."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        try:
            self._write(batch)
        finally:
            with self._lock:
                following = self._queue[0] if self._queue else None
                if following is None:
                    self._busy = False
            for call in batch:
                call.done = True
                call.wake()
            if following is not None:
                following.wake()

    def _write(self, batch: list[Call]) -> None:
        if len(batch) == 1:
            self._alone(batch[0])
            return
        try:
            self.batches += 1
            self.write([aggregate for call in batch for aggregate in call.aggregates])
        except Exception as error:
            if not isinstance(error, IntegrityError) and not _transient(error):
                for call in batch:  # the database refused the write as such: each call hears it
                    call.error = error
                return
            for call in batch:  # one of them conflicts (or the connection broke): each on its own
                self._alone(call)

    def _alone(self, call: Call) -> None:
        try:
            self.batches += 1
            self.write(call.aggregates)
        except BaseException as error:
            call.error = error


def _settle(answered: asyncio.Future[None]) -> None:
    if not answered.done():
        answered.set_result(None)


def _transient(error: BaseException) -> bool:
    from orchestrator.storage import is_transient

    return is_transient(error)
