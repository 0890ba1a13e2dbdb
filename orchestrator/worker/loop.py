"""The worker: claims due sagas in batches, runs their attempts concurrently, records outcomes.

One loop, one thread for bookkeeping: it claims work rows (``SKIP LOCKED`` on PostgreSQL),
records the claims of many sagas in one save, hands attempts to a thread pool (``def``
steps) or an event loop (``async def`` steps), and records their outcomes, again many per
save, together with the claim of each saga's next attempt, which it then runs at once.
The aggregate version settles every race: a stale save raises ``IntegrityError`` and only
that saga is reloaded and decided again. Side tasks (the log's followers, a scheduler) run
between rounds; those that wait on the world (notification deliveries) in a thread of their
own (``side``).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING

import structlog
from eventsourcing.persistence import PersistenceError

from orchestrator.errors import StorageUnavailable
from orchestrator.storage import is_transient, storage_error
from orchestrator.worker.attempts import Attempts
from orchestrator.worker.batch import Bookkeeper, utcnow
from orchestrator.worker.execution import describe
from orchestrator.worker.leases import Leases
from orchestrator.worker.side import SideTasks
from orchestrator.worker.state import SideTask, WorkerState

if TYPE_CHECKING:
    from orchestrator.client import Orchestrator

log = structlog.get_logger("sagaworks.worker")
MAX_BACKOFF = 30.0
"""Longest pause between two rounds of a worker whose storage keeps failing, in seconds."""


class Worker:
    """Runs saga attempts until drained or told to stop."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        concurrency: int | None = None,
        batch_size: int | None = None,
        lease_seconds: float | None = None,
        poll_interval: float | None = None,
        worker_id: str | None = None,
        side_tasks: Iterable[SideTask] = (),
    ) -> None:
        settings = orchestrator.settings
        self.orch = orchestrator
        self.concurrency = concurrency or settings.concurrency
        self.batch_size = batch_size or settings.batch_size
        worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self.state = WorkerState(
            worker_id=worker_id,
            lease=lease_seconds or settings.lease_seconds,
            poll_interval=poll_interval or settings.poll_interval,
            log=log.bind(worker=worker_id),
        )
        self.worker_id, self.log, self.stats = worker_id, self.state.log, self.state.stats
        self.attempts = Attempts(
            self.state, orchestrator.registry, self.concurrency, settings.max_input_bytes, orchestrator
        )
        self.books = Bookkeeper(self.state, orchestrator.repository, orchestrator.registry, self.attempts)
        self.leases = Leases(self.books)
        self.tasks = [*side_tasks, *orchestrator.side_tasks]
        self.side = SideTasks(self.tasks, self.state)
        """The side tasks run in the loop, between rounds (all of them when draining)."""
        self.background = SideTasks([], self.state)
        """The side tasks run in a thread of their own (``own_thread``), when not draining."""
        self.outside_work = True
        """Someone else may have made work due (another process, another thread, a timer)."""
        self.claim_at = 0.0
        """Monotonic time of the next look at the work table while busy (poll or known timer)."""
        self.grace = settings.shutdown_grace
        self.stop_deadline = float("inf")
        """Monotonic time after which a stopping worker leaves the attempts in hand to their leases."""
        self.failures_in_row = 0
        self.threads_left = 0
        """Step threads that had not returned when the worker stopped (hung or timed-out steps)."""

    @property
    def stopping(self) -> threading.Event:
        """Set once the worker was asked to stop."""
        return self.state.stopping

    def stop(self) -> None:
        """Ask the worker to finish the attempts in hand (for up to ``shutdown_grace`` s) and return."""
        if not self.state.stopping.is_set():
            self.stop_deadline = time.monotonic() + self.grace
        self.state.stopping.set()
        self.state.signal.set()

    def wake(self) -> None:
        """Called when work may be due: a NOTIFY, another connection's commit, a save in this process."""
        self.outside_work = True
        self.side.wake()
        self.background.wake()
        self.state.signal.set()

    def run(self, *, drain: bool) -> None:
        """Work until drained (``drain=True``) or until stopped, then return."""
        restore = self._install_signals() if not drain else None
        try:
            if not self._open(drain):
                return
            repository = self.orch.repository
            waker = None if drain else repository.index.waker(self.wake)
            if waker is not None:
                waker.start()
            repository.add_waker(self.wake)
            if not drain:
                # Tasks that wait on the world (a receiver, a user's hook) never hold up the steps.
                aside = [task for task in self.tasks if getattr(task, "own_thread", False)]
                self.side = SideTasks([task for task in self.tasks if task not in aside], self.state)
                self.background = SideTasks(aside, self.state)
                self.background.start()
            self.log.info("worker started", drain=drain, concurrency=self.concurrency)
            try:
                self._loop(drain)
            finally:
                self.background.stop(timeout=self.grace)
                repository.remove_waker(self.wake)
                if waker is not None:
                    waker.stop()
                self.threads_left = self.attempts.close()
                if self.threads_left:
                    self.log.warning("step threads still running after stop", threads=self.threads_left)
                peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.log.info("worker stopped", peak_rss_mb=round(peak_rss_mb, 1), **self.stats)
        finally:
            if restore is not None:
                restore()

    def _open(self, drain: bool) -> bool:
        """Open storage; while it is unreachable, try again with backoff (a drain gives up at once)."""
        delay = self.state.poll_interval
        while True:
            try:
                self.orch.open()
                if delay > self.state.poll_interval:
                    self.log.info("storage reachable; starting")
                return True
            except StorageUnavailable as error:
                if drain:
                    raise
                if delay == self.state.poll_interval:
                    self.log.warning("storage unreachable; trying again with backoff", error=str(error))
                if self.state.stopping.wait(delay):
                    return False
                delay = min(delay * 2, MAX_BACKOFF)

    def _loop(self, drain: bool) -> None:
        while True:
            self.state.signal.clear()
            try:
                finished = self.books.record_finished()
                claimed = 0
                if not self.state.stopping.is_set() and self._should_claim():
                    capacity = self.attempts.capacity(self.concurrency)
                    batch = min(capacity, self.batch_size)
                    claimed = self.books.claim(batch) if batch > 0 else 0
                    if claimed == batch > 0:
                        self.outside_work = True  # a full batch: there may be more waiting
                self.leases.renew()
                self.side.run_due()
                # Woken during the round (a side task admitted, scheduled or triggered sagas): not idle.
                idle = not claimed and not finished and not self.state.signal.is_set()
                if idle and self.attempts.running and self._grace_over():
                    return
                if idle and not self.attempts.running and (self.state.stopping.is_set() or drain):
                    if drain and not self.state.stopping.is_set() and self._sweep():
                        continue  # a side task found more to do now (a queued saga admitted, say)
                    return
                if idle:
                    self._idle()
            except Exception as error:
                if not self._round_failed(error, drain):
                    return
                continue
            if self.failures_in_row:
                self.log.info("storage working again", failed_rounds=self.failures_in_row)
                self.failures_in_row = 0

    def _round_failed(self, error: Exception, drain: bool) -> bool:
        """Back off after a failed round (the storage is away, read-only, full); whether to go on.

        Outcomes not yet recorded stay in hand for the next round; leases cover anything longer.
        The first failure in a row is logged, the rest are counted.
        """
        self.failures_in_row += 1
        self.stats["errors"] += 1
        if self.failures_in_row == 1:
            self.log.error(
                "worker round failed; retrying with backoff",
                error=describe(error),
                exc_info=None if is_transient(error) else error,
            )
        if drain and self.failures_in_row > 3:
            if isinstance(error, PersistenceError):
                raise storage_error(error, self.orch.database, "running the worker") from error
            raise error
        # While attempts are in hand, back off less than a lease, so their renewals keep up.
        cap = min(MAX_BACKOFF, self.state.lease / 3) if self.attempts.running else MAX_BACKOFF
        pause = min(self.state.poll_interval * 2**self.failures_in_row, cap)
        if self.state.stopping.is_set():
            left = self.stop_deadline - time.monotonic()
            if not self.attempts.running or left <= 0:
                if self.attempts.running:
                    self.log.warning(
                        "stopping with outcomes unrecorded: their leases will expire",
                        attempts=len(self.attempts.running),
                    )
                return False
            time.sleep(min(pause, left))  # within the grace period, try again to record what is in hand
            return True
        self.state.stopping.wait(pause)
        return True

    def _grace_over(self) -> bool:
        if not self.state.stopping.is_set() or time.monotonic() < self.stop_deadline:
            return False
        self.log.warning(
            "shutdown grace period over; leaving the attempts in hand to their leases",
            attempts=len(self.attempts.running),
            grace_seconds=self.grace,
        )
        return True

    # Claiming

    def _should_claim(self) -> bool:
        """Whether to look at the work table now.

        While attempts are running, the worker's own saves need no look (it carries its sagas
        on itself), so it looks only when told that outside work may be due, when its last
        claim came back full, or when the poll interval or a timer it knows of has passed;
        a claim round trip would otherwise sit between every two steps of every saga.
        """
        self.claim_at, self.books.look_at = min(self.claim_at, self.books.look_at), float("inf")
        if not self.attempts.running or self.outside_work or time.monotonic() >= self.claim_at:
            self.outside_work = False
            self.claim_at = time.monotonic() + self.state.poll_interval
            return True
        return False

    # Between rounds

    def _sweep(self) -> bool:
        """Run every side task now, due or not; whether that woke the worker (there is work now)."""
        self.side.sweep()
        return self.state.signal.is_set()

    def _idle(self) -> None:
        now = time.monotonic()
        timeout = self.state.poll_interval
        if self.state.stopping.is_set():
            timeout = min(timeout, max(0.0, self.stop_deadline - now))
        timeout = min(timeout, self.side.next_in(now))
        if not self.attempts.running:
            due = self.orch.repository.index.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, (due - utcnow()).total_seconds()))
        else:
            timeout = min(timeout, max(0.0, self.claim_at - now), self.attempts.next_deadline(now))
        self.state.signal.wait(timeout)

    def _install_signals(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: FrameType | None) -> None:
            self.log.info("stopping: finishing the attempts in hand", signal=signal.Signals(signum).name)
            self.stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore
