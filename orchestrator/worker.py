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
from eventsourcing.persistence import IntegrityError

from orchestrator.aggregate import Outcome, SagaAggregate, Work
from orchestrator.app import Orchestrator, utcnow
from orchestrator.definition import Results, Saga, StepDef
from orchestrator.executor import StepRunner

Intent = Callable[[SagaAggregate], Work | None]
log = structlog.get_logger("sagaworks.worker")


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
class Batch:
    """Intents to record in one save, keyed by saga."""

    intents: dict[UUID, tuple[SagaAggregate | None, Intent]] = field(default_factory=dict)
    """Each saga's aggregate as held in memory (``None``: load it) and what to do to it."""


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

    def stop(self) -> None:
        """Ask the worker to finish the attempts in hand and return."""
        self.stopping.set()
        self.signal.set()

    def wake(self) -> None:
        """Called when work may be due: a NOTIFY, another connection's commit, a save in this process."""
        self.outside_work = True
        self.signal.set()

    def run(self, *, drain: bool) -> None:
        """Work until drained (``drain=True``) or until stopped, then return."""
        store = self.orch.store
        restore = self._install_signals() if not drain else None
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
            if restore is not None:
                restore()
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.log.info("worker stopped", peak_rss_mb=round(peak_rss_mb, 1), **self.stats)

    def _loop(self, drain: bool) -> None:
        while True:
            self.signal.clear()
            try:
                finished = self._reap()
                claimed = 0
                if not self.stopping.is_set() and self._should_claim():
                    claimed = self._claim()
                self._renew()
            except Exception:
                # A storage error (lock timeout, lost connection): outcomes not yet recorded stay in
                # hand and are recorded on the next round; leases cover anything longer.
                self.stats["errors"] += 1
                self.log.exception("worker round failed; retrying")
                if drain and self.stats["errors"] > 3:
                    raise
                self.signal.wait(self.poll_interval)
                continue
            if not self.running and (self.stopping.is_set() or (drain and not claimed and not finished)):
                return
            if not claimed and not finished:
                self._idle()

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
        aggregates = self.orch.fold(records)
        for claim in claims:
            aggregate = aggregates.get(claim.saga_uuid)
            if aggregate is None:  # pragma: no cover - a row always follows its events
                continue
            if aggregate.run.saga not in self.orch.sagas:
                self.log.error("saga not registered in this worker", saga=aggregate.run.saga)
                continue  # the lease expires and a worker that knows the saga takes it
            if aggregate.id in self.running or aggregate.id in self.abandoned:
                # Still running here (a stalled round let its lease lapse), or a timed-out thread of it
                # has not returned: never run two attempts of one saga at once; look again shortly.
                later = utcnow() + timedelta(seconds=self.poll_interval)
                self._release(aggregate, max(later, aggregate.run.due_at or later))
                continue
            batch.intents[aggregate.id] = (aggregate, self._advance_intent())
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
        """Apply every intent and save them all in one transaction; on a conflict, one by one."""
        stale = [uuid for uuid, (aggregate, _) in batch.intents.items() if aggregate is None]
        fresh = self.orch.fold(self.orch.store.index.select_events_many(stale)) if stale else {}
        results: dict[UUID, tuple[SagaAggregate, Work | None]] = {}
        for uuid, (aggregate, intent) in batch.intents.items():
            aggregate = aggregate or fresh[uuid]
            results[uuid] = (aggregate, intent(aggregate))
        changed = [aggregate for aggregate, _ in results.values() if aggregate.pending_events]
        unchanged = {aggregate.id for aggregate, _ in results.values() if not aggregate.pending_events}
        try:
            if changed:
                self.stats["saves"] += 1
                self.orch.save(changed, wake=False)
        except IntegrityError:
            self.stats["conflicts"] += 1
            # Someone else wrote to one of these sagas; the batch is void. Redo each saga alone,
            # from a fresh load, so the conflict costs only the saga that had it.
            results, unchanged = {}, set()
            for uuid, (_, intent) in batch.intents.items():
                redone = self._commit_one(uuid, intent)
                if redone is not None:
                    results[uuid], changed_now = redone
                    if not changed_now:
                        unchanged.add(uuid)
        for uuid, (aggregate, work) in results.items():
            if uuid in unchanged and work is None and uuid not in self.running:
                self._release(aggregate)  # claimed, but nothing was due: hand the row back
            due = aggregate.run.due_at
            if work is None and due is not None:  # a retry or timeout: look again when it falls due
                self.claim_at = min(self.claim_at, time.monotonic() + max(0.0, (due - utcnow()).total_seconds()))
            if work is not None:
                self._start(aggregate, work)

    def _commit_one(self, uuid: UUID, intent: Intent) -> tuple[tuple[SagaAggregate, Work | None], bool] | None:
        """Apply ``intent`` to a fresh load of one saga and save it; also say whether it changed."""
        for _ in range(5):
            aggregate = self.orch.load(uuid)
            work = intent(aggregate)
            if not aggregate.pending_events:
                return (aggregate, work or self._adopt(aggregate)), False
            try:
                self.stats["saves"] += 1
                self.orch.save([aggregate], wake=False)
                return (aggregate, work), True
            except IntegrityError:
                self.stats["conflicts"] += 1
                continue
        self.log.warning("gave up recording after repeated conflicts", saga_uuid=str(uuid))
        return None

    def _adopt(self, aggregate: SagaAggregate) -> Work | None:
        """The attempt this worker recorded itself, if the save that did so reported a conflict.

        A commit whose acknowledgement was lost is retried by the library and then reported as a
        conflict although it landed: the reloaded saga shows our own claim, which we must run.
        """
        flight = aggregate.run.in_flight
        if flight is None or flight.worker != self.worker_id or aggregate.id in self.running:
            return None
        return Work(aggregate.id, flight.kind, flight.name, flight.attempt)

    def _release(self, aggregate: SagaAggregate, due_at: datetime | None = None) -> None:
        """Hand a claimed row back, due when the saga says (or at ``due_at``)."""
        self.stats["releases"] += 1
        self.orch.store.index.release(aggregate.id, aggregate.version, due_at or aggregate.run.due_at)

    # Running

    def _start(self, aggregate: SagaAggregate, work: Work) -> None:
        saga = self.orch.sagas[aggregate.run.saga]
        node = saga.step_map[work.name]
        instance = self._instance(saga, aggregate, work)
        args: tuple[Any, ...]
        if work.kind == "step":
            fn, args, policy = node.fn, (instance, instance.input), node.retry
        else:
            assert node.compensation is not None
            result = instance.results.get(node.name)
            fn, args, policy = node.compensation.fn, (instance, instance.input, result), node.compensation.retry
        future = self.runner.submit(
            fn, args, instance._log_context, lambda value: _serialise(node, work, value, instance), policy.gives_up
        )
        future.add_done_callback(lambda _: self.signal.set())
        self.stats["attempts"] += 1
        now = time.monotonic()
        deadline = None if node.timeout is None else now + node.timeout
        self.running[aggregate.id] = Running(work, aggregate, future, now, deadline, now + self.lease / 3)

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
            batch.intents[uuid] = (aggregate, self._outcome_intent(running.work, running.outcome))
        if batch.intents:
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
        return len(batch.intents)

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
                running.aggregate, running.stale = self.orch.load(uuid), False
            if running.aggregate.renew(running.work, lease_until, utcnow()):
                changed.append(running)
        if not changed:
            return
        try:
            self.stats["saves"] += 1
            self.orch.save([r.aggregate for r in changed], wake=False)
        except IntegrityError:
            for running in changed:
                self._renew_one(running, lease_until)
        except Exception:
            for running in changed:
                running.stale = True  # the failed save changed them in memory only
            raise

    def _renew_one(self, running: Running, lease_until: datetime) -> None:
        def renew(aggregate: SagaAggregate) -> Work | None:
            aggregate.renew(running.work, lease_until, utcnow())
            return None

        redone = self._commit_one(running.work.saga_uuid, renew)
        if redone is not None:
            running.aggregate = redone[0][0]

    def _idle(self) -> None:
        timeout = self.poll_interval
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
        work = running.work
        self.log.info(
            "attempt succeeded" if outcome.error is None else "attempt failed",
            saga_id=running.aggregate.run.saga_id,
            saga=running.aggregate.run.saga,
            step=work.name,
            kind=work.kind,
            attempt=work.attempt,
            ms=round((time.monotonic() - running.started) * 1000, 1),
            error=outcome.error,
        )

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


def _serialise(node: StepDef, work: Work, value: Any, instance: Saga[Any]) -> Outcome:
    if work.kind == "compensation":
        return Outcome()
    try:
        result = node.output.dump_python(node.output.validate_python(value), mode="json")
    except Exception as error:
        return Outcome(error=f"step returned an invalid output: {error}", retryable=False)
    return Outcome(result=result, emitted=list(instance._emitted))
