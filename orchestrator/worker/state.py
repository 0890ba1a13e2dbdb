"""What the parts of one worker share: who it is, its lease, its log and counters, its signals."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class WorkerState:
    """The identity, timing and bookkeeping of one worker, shared by its loop, batches and leases."""

    worker_id: str
    lease: float
    """Seconds an attempt's claim lasts before another worker may take it over."""
    poll_interval: float
    log: Any
    stats: Counter[str] = field(default_factory=Counter)
    """Transactions by kind (claims, saves, releases), attempts run, conflicts and errors met."""
    stopping: threading.Event = field(default_factory=threading.Event)
    signal: threading.Event = field(default_factory=threading.Event)
    """Wakes the loop: an attempt finished, work may be due, or stop was asked."""


class SideTask(Protocol):
    """Work a worker does between rounds of steps (a scheduler, a projection runner, a notifier).

    Tasks run in the worker's loop thread, between rounds, so each run must be short; a task
    that waits on the world (a receiver, a user's hook) sets ``own_thread = True`` and runs in a
    thread of the worker's instead (in the loop when it drains). The worker runs a task again
    after the seconds ``run`` returns (``None``: the poll interval), or, if it raised, after a
    backoff.
    """

    name: str
    # A task may also set ``on_wake = True``: new events make it due soon (it follows the log),
    # and ``own_thread = True`` (see above).

    def run(self) -> float | None:
        """Do what is due now; seconds until the task wants to run again."""
