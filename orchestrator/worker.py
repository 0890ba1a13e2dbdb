"""The worker: claims due sagas in batches, runs their attempts concurrently, records outcomes.

One loop, one thread for bookkeeping: it claims work rows (``SKIP LOCKED`` on PostgreSQL),
records the claims of many sagas in one save, hands attempts to a thread pool (``def``
steps) or an event loop (``async def`` steps), and records their outcomes, again many per
save, together with the claim of each saga's next attempt, which it then runs at once.
The aggregate version settles every race: a stale save raises ``IntegrityError`` and only
that saga is reloaded and decided again.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import FrameType
from typing import Any
from uuid import UUID

import structlog
from eventsourcing.persistence import IntegrityError, PersistenceError

from orchestrator import events as ev
from orchestrator.aggregate import Outcome, SagaAggregate, Work
from orchestrator.app import Orchestrator, one_line, utcnow
from orchestrator.definition import Results, Saga, StepDef
from orchestrator.errors import StorageUnavailable
from orchestrator.executor import StepRunner, describe
from orchestrator.safety import clean_error, encode, unstorable
from orchestrator.store import is_transient, storage_error

Intent = Callable[[SagaAggregate], Work | None]
Fallback = Callable[[str], Intent]
"""Given why an outcome could not be stored, the intent that records that instead."""
log = structlog.get_logger("sagaworks.worker")
MAX_BACKOFF = 30.0
"""Longest pause between two rounds of a worker whose storage keeps failing, in seconds."""


@dataclass
class Running:
    """An attempt in flight in this worker."""

    work: Work
    aggregate: SagaAggregate
    future: Future[Outcome]
    started: float
    deadline: float | None
    renew_at: float
    outcome: Outcome | None = None
    stale: bool = False
    """A save that failed touched ``aggregate``: reload it before recording the outcome."""


@dataclass
class Job:
    """What to record for one saga: its aggregate as held in memory (``None``: load it), what to
    do to it, and what to record instead if the result cannot be stored."""

    aggregate: SagaAggregate | None
    intent: Intent
    fallback: Fallback | None = None


@dataclass
class Batch:
    """Jobs to record in one save, keyed by saga."""

    jobs: dict[UUID, Job] = field(default_factory=dict)


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
    ) -> None:
        settings = orchestrator.settings
        self.orch = orchestrator
        self.concurrency = concurrency or settings.concurrency
        self.batch_size = batch_size or settings.batch_size
        self.lease = lease_seconds or settings.lease_seconds
        self.poll_interval = poll_interval or settings.poll_interval
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xFFFF:x}"
        self.stopping = threading.Event()
        self.running: dict[UUID, Running] = {}
        self.abandoned: dict[UUID, Future[Outcome]] = {}
        """Timed-out ``def`` attempts whose threads have not returned: they still hold a thread."""
        self.runner = StepRunner(self.concurrency)
        self.log = log.bind(worker=self.worker_id)
        self.stats: Counter[str] = Counter()
        """Transactions by kind (claims, saves, releases), attempts run, and conflicts met."""
        self.signal = threading.Event()
        """Wakes the loop: an attempt finished, work may be due, or stop was asked."""
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

    def stop(self) -> None:
        """Ask the worker to finish the attempts in hand (for up to ``shutdown_grace`` s) and return."""
        if not self.stopping.is_set():
            self.stop_deadline = time.monotonic() + self.grace
        self.stopping.set()
        self.signal.set()

    def wake(self) -> None:
        """Called when work may be due: a NOTIFY, another connection's commit, a save in this process."""
        self.outside_work = True
        self.signal.set()

    def run(self, *, drain: bool) -> None:
        """Work until drained (``drain=True``) or until stopped, then return."""
        restore = self._install_signals() if not drain else None
        try:
            if not self._open(drain):
                return
            store = self.orch.store
            waker = None if drain else store.index.waker(self.wake)
            if waker is not None:
                waker.start()
            self.orch.add_waker(self.wake)
            self.log.info("worker started", drain=drain, concurrency=self.concurrency)
            try:
                self._loop(drain)
            finally:
                self.orch.remove_waker(self.wake)
                if waker is not None:
                    waker.stop()
                self.runner.close()
                # Sync steps still running (hung, or timed out and abandoned) hold their threads.
                futures = [*self.abandoned.values(), *(r.future for r in self.running.values())]
                self.threads_left = sum(not future.done() for future in futures)
                if self.threads_left:
                    self.log.warning("step threads still running after stop", threads=self.threads_left)
                peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.log.info("worker stopped", peak_rss_mb=round(peak_rss_mb, 1), **self.stats)
        finally:
            if restore is not None:
                restore()

    def _open(self, drain: bool) -> bool:
        """Open storage; while it is unreachable, try again with backoff (a drain gives up at once)."""
        delay = self.poll_interval
        while True:
            try:
                self.orch.open()
                if delay > self.poll_interval:
                    self.log.info("storage reachable; starting")
                return True
            except StorageUnavailable as error:
                if drain:
                    raise
                if delay == self.poll_interval:
                    self.log.warning("storage unreachable; trying again with backoff", error=str(error))
                if self.stopping.wait(delay):
                    return False
                delay = min(delay * 2, MAX_BACKOFF)

    def _loop(self, drain: bool) -> None:
        while True:
            self.signal.clear()
            try:
                finished = self._reap()
                claimed = 0
                if not self.stopping.is_set() and self._should_claim():
                    claimed = self._claim()
                self._renew()
                idle = not claimed and not finished
                if idle and self.running and self._grace_over():
                    return
                if idle and not self.running and (self.stopping.is_set() or drain):
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
        cap = min(MAX_BACKOFF, self.lease / 3) if self.running else MAX_BACKOFF
        pause = min(self.poll_interval * 2**self.failures_in_row, cap)
        if self.stopping.is_set():
            left = self.stop_deadline - time.monotonic()
            if not self.running or left <= 0:
                if self.running:
                    self.log.warning(
                        "stopping with outcomes unrecorded: their leases will expire", attempts=len(self.running)
                    )
                return False
            time.sleep(min(pause, left))  # within the grace period, try again to record what is in hand
            return True
        self.stopping.wait(pause)
        return True

    def _grace_over(self) -> bool:
        if not self.stopping.is_set() or time.monotonic() < self.stop_deadline:
            return False
        self.log.warning(
            "shutdown grace period over; leaving the attempts in hand to their leases",
            attempts=len(self.running),
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
        if not self.running or self.outside_work or time.monotonic() >= self.claim_at:
            self.outside_work = False
            self.claim_at = time.monotonic() + self.poll_interval
            return True
        return False

    def _claim(self) -> int:
        self.abandoned = {uuid: f for uuid, f in self.abandoned.items() if not f.done()}
        capacity = self.concurrency - len(self.running) - len(self.abandoned)
        if capacity <= 0:
            return 0
        now = utcnow()
        claims, records = self.orch.store.index.claim_loaded(
            self.worker_id, now, now + timedelta(seconds=self.lease), min(capacity, self.batch_size)
        )
        self.stats["claims"] += 1
        if len(claims) == min(capacity, self.batch_size):
            self.outside_work = True  # a full batch: there may be more waiting
        if not claims:
            return 0
        batch = Batch()
        aggregates, broken = self.orch.fold_each(records)
        for claim in claims:
            uuid = claim.saga_uuid
            aggregate = aggregates.get(uuid)
            if uuid in self.running or uuid in self.abandoned:
                # Still running here (a stalled round let its lease lapse), or a timed-out thread of it
                # has not returned: never run two attempts of one saga at once; look again shortly.
                later = utcnow() + timedelta(seconds=self.poll_interval)
                due = aggregate.run.due_at if aggregate is not None else None
                self._release_row(uuid, claim.version, max(later, due or later))
                continue
            if uuid in broken:
                self._set_aside(uuid, claim.version, broken[uuid][1])
                continue
            if aggregate is None:  # pragma: no cover - a row always follows its events
                continue
            if aggregate.run.saga not in self.orch.sagas:
                self.log.error("saga not registered in this worker", saga=aggregate.run.saga)
                continue  # the lease expires and a worker that knows the saga takes it
            batch.jobs[uuid] = Job(aggregate, self._advance_intent())
        self._commit(batch)
        return len(claims)

    def _advance_intent(self) -> Intent:
        def intent(aggregate: SagaAggregate) -> Work | None:
            return aggregate.advance(
                utcnow(),
                self.worker_id,
                self.lease,
                self.orch.policies[aggregate.run.saga],
                claim=not self.stopping.is_set(),
            )

        return intent

    # Recording

    def _commit(self, batch: Batch) -> None:
        """Apply every job and save them all in one transaction; on a conflict, one by one.

        Whatever goes wrong with one saga (its history does not load, its intent raises, its
        events or status cannot be stored) is confined to it: the others are recorded without it.
        """
        stale = [uuid for uuid, job in batch.jobs.items() if job.aggregate is None]
        fresh, broken = self.orch.fold_each(self.orch.store.index.select_events_many(stale)) if stale else ({}, {})
        results: dict[UUID, tuple[SagaAggregate, Work | None]] = {}
        aside: set[UUID] = set(broken)
        for uuid, job in batch.jobs.items():
            if uuid in broken:
                self._set_aside(uuid, *broken[uuid])
                continue
            aggregate = job.aggregate or fresh[uuid]
            version = aggregate.version - len(aggregate.pending_events)
            try:
                work = job.intent(aggregate)
            except Exception as error:
                aside.add(uuid)
                self._set_aside(uuid, version, f"deciding its next step failed: {describe(error)}", error)
                continue
            # A reloaded saga may show an attempt whose claim this worker saved in a round that then
            # failed (the commit landed, its acknowledgement was lost): run it.
            results[uuid] = (aggregate, work or (None if aggregate.pending_events else self._adopt(aggregate)))
        changed = [aggregate for aggregate, _ in results.values() if aggregate.pending_events]
        unchanged = {aggregate.id for aggregate, _ in results.values() if not aggregate.pending_events}
        recorded = {a.id: list(a.pending_events) for a in changed}
        try:
            if changed:
                self.stats["saves"] += 1
                self.orch.save(changed, wake=False)
        except Exception as error:
            if not isinstance(error, IntegrityError) and is_transient(error):
                raise
            # A conflict (someone else wrote to one of these sagas) or one saga's data that the
            # database refused: the batch is void. Redo each saga alone, from a fresh load, so
            # the trouble costs only the saga that had it.
            self.stats["conflicts" if isinstance(error, IntegrityError) else "batch_errors"] += 1
            results, unchanged, recorded = {}, set(), {}
            for uuid, job in batch.jobs.items():
                if uuid in aside:
                    continue
                redone = self._commit_one(uuid, job)
                if redone is not None:
                    aggregate, work, events = redone
                    results[uuid] = (aggregate, work)
                    if events:
                        recorded[uuid] = events
                    else:
                        unchanged.add(uuid)
        for uuid, events in recorded.items():
            self._log_recorded(results[uuid][0], events)
        for uuid, (aggregate, work) in results.items():
            if uuid in unchanged and work is None and uuid not in self.running:
                self._release(aggregate)  # claimed, but nothing was due: hand the row back
            due = aggregate.run.due_at
            if work is None and due is not None:  # a retry or timeout: look again when it falls due
                self.claim_at = min(self.claim_at, time.monotonic() + max(0.0, (due - utcnow()).total_seconds()))
            if work is not None:
                self._start(aggregate, work)

    def _commit_one(self, uuid: UUID, job: Job) -> tuple[SagaAggregate, Work | None, list[Any]] | None:
        """Apply ``job`` to a fresh load of one saga and save it, with the events it recorded
        (none: nothing changed); ``None`` if it could not be recorded."""
        intent, fallback = job.intent, job.fallback
        version = 0
        for _ in range(5):
            loaded, broken = self.orch.fold_each(self.orch.store.index.select_events_many([uuid]))
            if uuid in broken:
                self._set_aside(uuid, *broken[uuid])
                return None
            aggregate = loaded[uuid]
            version = aggregate.version
            try:
                work = intent(aggregate)
            except Exception as error:
                self._set_aside(uuid, version, f"deciding its next step failed: {describe(error)}", error)
                return None
            if not aggregate.pending_events:
                return aggregate, work or self._adopt(aggregate), []
            events = list(aggregate.pending_events)
            try:
                self.stats["saves"] += 1
                self.orch.save([aggregate], wake=False)
                return aggregate, work, events
            except IntegrityError:
                self.stats["conflicts"] += 1
                continue
            except Exception as error:
                if is_transient(error):
                    raise
                if fallback is None:
                    self._set_aside(uuid, version, f"its events cannot be stored: {describe(error)}", error)
                    return None
                # The outcome itself may be what the database refuses: record its failure instead.
                intent, fallback = fallback(describe(error)), None
        self._set_aside(uuid, version, "its events kept conflicting with other writers")
        return None

    def _set_aside(self, uuid: UUID, version: int, problem: str, error: BaseException | None = None) -> None:
        """Rest a saga that cannot be loaded or recorded, with backoff; never retry it in a hot loop."""
        self.stats["set_aside"] += 1
        running = self.running.pop(uuid, None)
        if running is not None and not running.future.done():
            self.abandoned[uuid] = running.future  # its thread still runs: no second attempt beside it
        problem = clean_error(problem)
        try:
            due_at = self.orch.store.index.set_aside(uuid, version, problem, utcnow())
        except Exception as failure:
            if is_transient(failure):
                raise
            # Its lease runs out, and a later claim tries again.
            self.log.exception("could not set a saga aside", saga_uuid=str(uuid), problem=problem)
            return
        self.log.error(
            "saga set aside",
            saga_uuid=str(uuid),
            problem=problem,
            retry_at=due_at.isoformat() if due_at else None,
            exc_info=error,
        )

    def _adopt(self, aggregate: SagaAggregate) -> Work | None:
        """The attempt this worker recorded itself, if the save that did so reported a conflict.

        A commit whose acknowledgement was lost is retried by the library and then reported as a
        conflict although it landed: the reloaded saga shows our own claim, which we must run.
        """
        flight = aggregate.run.in_flight
        if flight is None or flight.worker != self.worker_id:
            return None
        work = Work(aggregate.id, flight.kind, flight.name, flight.attempt)
        running = self.running.get(aggregate.id)
        if (running is not None and running.work == work) or aggregate.id in self.abandoned:
            return None  # that very attempt is running here already
        return work

    def _release(self, aggregate: SagaAggregate, due_at: datetime | None = None) -> None:
        """Hand a claimed row back, due when the saga says (or at ``due_at``)."""
        self._release_row(aggregate.id, aggregate.version, due_at or aggregate.run.due_at)

    def _release_row(self, uuid: UUID, version: int, due_at: datetime | None) -> None:
        self.stats["releases"] += 1
        self.orch.store.index.release(uuid, version, due_at)

    # Running

    def _start(self, aggregate: SagaAggregate, work: Work) -> None:
        saga = self.orch.sagas[aggregate.run.saga]
        node = saga.step_map.get(work.name)
        future: Future[Outcome]
        try:
            if node is None:
                raise LookupError(f"{saga.name} has no step {work.name!r} any more")
            instance = self._instance(saga, aggregate, work)
            args: tuple[Any, ...]
            if work.kind == "step":
                fn, args, policy = node.fn, (instance, instance.input), node.retry
            else:
                if node.compensation is None:
                    raise LookupError(f"step {work.name!r} of {saga.name} has no compensation any more")
                result = instance.results.get(node.name)
                fn, args, policy = node.compensation.fn, (instance, instance.input, result), node.compensation.retry
        except Exception as error:
            # The saga's stored input or results no longer fit its code: this attempt cannot run at all.
            future = Future()
            future.set_result(Outcome(error=f"the attempt cannot start: {describe(error)}", retryable=False))
            timeout = None
        else:
            serialise = self._serialiser(node, work, instance)
            future = self.runner.submit(fn, args, instance._log_context, serialise, policy.gives_up)
            timeout = node.timeout
        future.add_done_callback(lambda _: self.signal.set())
        self.stats["attempts"] += 1
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        self.running[aggregate.id] = Running(work, aggregate, future, now, deadline, now + self.lease / 3)

    def _serialiser(self, node: StepDef, work: Work, instance: Saga[Any]) -> Callable[[Any], Outcome]:
        max_bytes = self.orch.settings.max_input_bytes
        return lambda value: serialise(node, work, value, instance, max_bytes)

    def _instance(self, saga: type[Saga[Any]], aggregate: SagaAggregate, work: Work) -> Saga[Any]:
        run = aggregate.run
        instance = saga.__new__(saga)
        instance.saga_id = run.saga_id
        instance.input = aggregate.input_model(saga)
        instance.results = Results(saga, run.results)
        instance.received = dict(run.received)
        instance.attempt = work.attempt
        suffix = "" if work.kind == "step" else "#compensate"  # '#' is in no step name: keys never collide
        instance.idempotency_key = f"{run.saga_id}:{work.name}{suffix}"
        instance._log_context = {
            "saga_id": run.saga_id,
            "saga": saga.name,
            "step": work.name,
            "kind": work.kind,
            "attempt": work.attempt,
            "worker": self.worker_id,
        }
        instance._emitted = []
        return instance

    def _reap(self) -> int:
        """Record the outcomes of finished (or timed-out) attempts, many sagas per save."""
        now = time.monotonic()
        batch = Batch()
        ended: dict[UUID, Running] = {}
        for uuid, running in list(self.running.items()):
            if running.outcome is None:
                if running.future.done():
                    running.outcome = running.future.result()
                elif running.deadline is not None and now >= running.deadline:
                    if not running.future.cancel():  # an async step stops; a sync one runs on, ignored
                        self.abandoned[uuid] = running.future
                    seconds = running.deadline - running.started
                    running.outcome = Outcome(error=f"TimeoutError: attempt timed out after {seconds:g} s")
                else:
                    continue
                self._log_outcome(running, running.outcome)
            ended[uuid] = running
            aggregate = None if running.stale else running.aggregate
            work = running.work
            batch.jobs[uuid] = Job(aggregate, self._outcome_intent(work, running.outcome), self._unstorable(work))
        if batch.jobs:
            try:
                self._commit(batch)
            except Exception:
                # Outcomes stay in hand for the next round; the aggregates, changed in memory by a
                # save that failed, are reloaded then (a failed save leaves them unusable).
                for running in ended.values():
                    running.stale = True
                raise
            for uuid, running in ended.items():
                if self.running.get(uuid) is running:  # not replaced by the saga's next attempt
                    del self.running[uuid]
        return len(batch.jobs)

    def _unstorable(self, work: Work) -> Fallback:
        def fallback(reason: str) -> Intent:
            return self._outcome_intent(
                work, Outcome(error=f"the attempt's outcome could not be stored: {reason}", retryable=False)
            )

        return fallback

    def _outcome_intent(self, work: Work, outcome: Outcome) -> Intent:
        advance = self._advance_intent()

        def intent(aggregate: SagaAggregate) -> Work | None:
            policies = self.orch.policies[aggregate.run.saga]
            if not aggregate.record_outcome(work, outcome, utcnow(), policies):
                return None  # no longer ours: the lease expired and another worker took over
            return advance(aggregate)

        return intent

    def _renew(self) -> None:
        now = time.monotonic()
        due = [(uuid, r) for uuid, r in self.running.items() if now >= r.renew_at]
        if not due:
            return
        lease_until = utcnow() + timedelta(seconds=self.lease)
        changed = []
        for uuid, running in due:
            running.renew_at = now + self.lease / 3
            if running.stale:
                loaded, broken = self.orch.fold_each(self.orch.store.index.select_events_many([uuid]))
                if uuid in broken:
                    self._set_aside(uuid, *broken[uuid])
                    continue
                running.aggregate, running.stale = loaded[uuid], False
            if running.aggregate.renew(running.work, lease_until, utcnow()):
                changed.append(running)
        if not changed:
            return
        try:
            self.stats["saves"] += 1
            self.orch.save([r.aggregate for r in changed], wake=False)
        except Exception as error:
            for running in changed:
                running.stale = True  # the failed save changed them in memory only
            if not isinstance(error, IntegrityError) and is_transient(error):
                raise
            for running in changed:
                self._renew_one(running, lease_until)

    def _renew_one(self, running: Running, lease_until: datetime) -> None:
        def renew(aggregate: SagaAggregate) -> Work | None:
            aggregate.renew(running.work, lease_until, utcnow())
            return None

        redone = self._commit_one(running.work.saga_uuid, Job(None, renew))
        if redone is not None:
            running.aggregate, running.stale = redone[0], False

    def _idle(self) -> None:
        timeout = self.poll_interval
        if self.stopping.is_set():
            timeout = min(timeout, max(0.0, self.stop_deadline - time.monotonic()))
        if not self.running:
            due = self.orch.store.index.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, (due - utcnow()).total_seconds()))
        else:
            now = time.monotonic()
            timeout = min(timeout, max(0.0, self.claim_at - now))
            for running in self.running.values():
                timeout = min(timeout, max(0.0, running.renew_at - now))
                if running.deadline is not None:
                    timeout = min(timeout, max(0.0, running.deadline - now))
        self.signal.wait(timeout)

    def _log_outcome(self, running: Running, outcome: Outcome) -> None:
        if outcome.error is None:
            work = running.work
            self.log.debug(
                "attempt succeeded",
                saga_id=running.aggregate.run.saga_id,
                saga=running.aggregate.run.saga,
                step=work.name,
                kind=work.kind,
                attempt=work.attempt,
                ms=round((time.monotonic() - running.started) * 1000, 1),
            )

    def _log_recorded(self, aggregate: SagaAggregate, events: list[Any]) -> None:
        """Log what was just recorded: failures at warning (for good: error), one line per saga outcome."""
        run = aggregate.run
        context = {"saga_id": run.saga_id, "saga": run.saga}
        for event in events:
            if isinstance(event, ev.StepAttemptFailed | ev.CompensationAttemptFailed):
                kind = "step" if isinstance(event, ev.StepAttemptFailed) else "compensation"
                self.log.warning(
                    f"{kind} attempt failed; retrying later",
                    **context,
                    step=event.name,
                    attempt=event.attempt,
                    error=event.error,
                    retry_at=event.retry_at.isoformat(),
                )
            elif isinstance(event, ev.StepFailed | ev.CompensationFailed):
                kind = "step" if isinstance(event, ev.StepFailed) else "compensation"
                running = self.running.get(aggregate.id)
                exception = running.outcome.exception if running and running.outcome else None
                self.log.error(
                    f"{kind} failed for good",
                    **context,
                    step=event.name,
                    attempt=event.attempt,
                    error=event.error,
                    exc_info=exception,
                    **({"traceback": event.traceback} if event.traceback and exception is None else {}),
                )
            elif isinstance(event, ev.SagaFailed):
                self.log.error("saga failed", **context, error=event.error)
            elif type(event) in TERMINAL_LINES:
                self.log.info(TERMINAL_LINES[type(event)], **context, **({"error": run.error} if run.error else {}))

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


TERMINAL_LINES: dict[type[Any], str] = {
    ev.SagaCompleted: "saga completed",
    ev.SagaCompensated: "saga compensated",
    ev.SagaCancelled: "saga cancelled",
}


def serialise(node: StepDef, work: Work, value: Any, instance: Saga[Any], max_bytes: int) -> Outcome:
    """The outcome of an attempt that returned ``value``: its output as it will be stored, or a
    non-retryable failure saying why it cannot be (running the step again would not help)."""
    if work.kind == "compensation":
        return Outcome()
    try:
        valid = node.output.validate_python(value)
    except Exception as error:
        return Outcome(error=f"step returned an invalid output: {one_line(error)}", retryable=False)
    reason = unstorable(valid, "output")
    try:
        result = node.output.dump_python(valid, mode="json")
        reason = reason or unstorable(result, "output")  # what serialisers made of it (enums, keys)
        if reason is None:
            encode(result, "the output", max_bytes)
        for emitted in instance._emitted:
            reason = reason or unstorable(emitted["name"], "an emitted event's name")
            reason = reason or unstorable(emitted["data"], f"emitted event {emitted['name']!r}")
            if reason is None:
                encode(emitted["data"], f"emitted event {emitted['name']!r}", max_bytes)
    except Exception as error:
        reason = reason or describe(error)
    if reason is not None:
        return Outcome(error=f"step returned an output that cannot be stored: {reason}", retryable=False)
    return Outcome(result=result, emitted=list(instance._emitted))
