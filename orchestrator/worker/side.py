"""Side tasks: what a worker does beside its sagas' steps (notifications, triggers, data changes,
admission, schedules), each when it is due.

Most run in the worker's loop, between rounds: they are short, and running them there also
spaces the rounds out, so each save carries more sagas (in a thread of their own, the log's
followers made rounds shorter and cost the bench 10-15% of its throughput). Tasks that wait on
the world (notification deliveries: a receiver that answers slowly, a user's hook that hangs)
set ``own_thread`` and run in a thread, so they never sit between two steps of a saga. A
draining worker runs every task in its loop, so that "drained" means their work is done too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from orchestrator.storage import is_transient
from orchestrator.worker.execution import describe
from orchestrator.worker.state import SideTask, WorkerState

WAKE_GAP = 0.02
"""Seconds at least between two runs of a log-following side task that new events made due."""
MAX_BACKOFF = 30.0
"""Longest pause of side tasks whose storage keeps failing, in seconds."""


class SideTasks:
    """The side tasks of one worker, with when each is due next."""

    def __init__(self, tasks: Iterable[SideTask], state: WorkerState) -> None:
        self.tasks = list(tasks)
        self.state = state
        self.due = {id(task): 0.0 for task in self.tasks}
        self.ran: dict[int, float] = {}
        self.woken = threading.Event()
        """New events were written: the tasks that follow the log are due soon (``on_wake``)."""
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()

    def wake(self) -> None:
        """New events may be due for the tasks that follow the log."""
        self.woken.set()

    def run_due(self) -> None:
        """Run the tasks that are due; one that fails is logged and tried again later.

        A transient storage error is raised: the caller backs off.
        """
        now = time.monotonic()
        if self.woken.is_set():
            self.woken.clear()
            for task in self.tasks:
                if getattr(task, "on_wake", False):
                    key = id(task)
                    self.due[key] = min(self.due[key], self.ran.get(key, 0.0) + WAKE_GAP)
        for task in self.tasks:
            if now < self.due[id(task)] or self.state.stopping.is_set():
                continue
            try:
                delay = task.run()
            except Exception as error:
                if is_transient(error):
                    raise
                self.state.log.exception("side task failed; trying again later", task=task.name)
                delay = MAX_BACKOFF
            self.due[id(task)] = now + (self.state.poll_interval if delay is None else delay)
            self.ran[id(task)] = now

    def sweep(self) -> None:
        """Run every task now, due or not."""
        for task in self.tasks:
            self.due[id(task)] = 0.0
        self.run_due()

    def next_in(self, now: float) -> float:
        """Seconds until the next task falls due (infinite when there are none)."""
        return max(0.0, min(self.due.values()) - now) if self.due else float("inf")

    # In a thread of their own

    def start(self) -> None:
        """Run the tasks in a thread until ``stop``."""
        if not self.tasks:
            return
        self.finished.clear()
        self.thread = threading.Thread(target=self._run, name="sagaworks-side-tasks", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (a task in the middle of a run finishes it first, for up to ``timeout`` s)."""
        if self.thread is None:
            return
        self.finished.set()
        self.woken.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.state.log.warning("side tasks still running after stop", timeout_seconds=timeout)
        self.thread = None

    def _run(self) -> None:
        failures = 0
        while not self.finished.is_set() and not self.state.stopping.is_set():
            try:
                self.run_due()
            except Exception as error:
                failures += 1
                if failures == 1:
                    self.state.log.warning("side tasks failed; retrying with backoff", error=describe(error))
                self.finished.wait(min(self.state.poll_interval * 2**failures, MAX_BACKOFF))
                continue
            if failures:
                self.state.log.info("side tasks working again", failed_rounds=failures)
                failures = 0
            self.woken.wait(min(self.next_in(time.monotonic()), MAX_BACKOFF))
