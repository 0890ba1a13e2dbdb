"""Group commit: concurrent commands of one process share transactions.

Every save goes behind the events table's lock, so a hundred callers that each start one saga
wait on each other a hundred times. Here, while one transaction is in flight, the calls that
arrive queue up; when it ends, the first of them leads the next transaction for all of them.
A lone call commits at once (it leads its own); a burst shares one lock and one commit.

Each call returns only once its own events are durable, and gets its own answer: if the shared
transaction fails (one saga's events conflict, a start repeats an id already taken, even in the
same batch), each call of the batch is written again on its own, so the conflict reaches only
its caller and its neighbours are saved as if they had been alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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
    lead: bool = False
    """Set (with ``ready``) when this call must lead the next transaction."""
    done: bool = False
    error: BaseException | None = None


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

    def save(self, aggregates: list[Any]) -> None:
        """Write ``aggregates`` (with the calls that queue meanwhile); return once durable, or raise
        this call's own error."""
        call = Call(aggregates)
        with self._lock:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
        if not lead:
            call.ready.wait()
        if not call.done:  # leading: write what has queued, this call first
            self._lead()
        if call.error is not None:
            raise call.error

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
                call.ready.set()
            if following is not None:
                following.lead = True
                following.ready.set()

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


def _transient(error: BaseException) -> bool:
    from orchestrator.storage import is_transient

    return is_transient(error)
