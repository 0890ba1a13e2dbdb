"""Recording decisions many sagas at a time: claims, outcomes and the next claims in one save,
and, when that save fails, each saga on its own, so trouble costs only the saga that has it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent

from orchestrator import metrics
from orchestrator.aggregate import Outcome, SagaAggregate, Work
from orchestrator.registry import Registry
from orchestrator.repository import Conflicted, HistoryUnloadable, Repository
from orchestrator.safety import clean_error
from orchestrator.storage import Claim, IndexEntry, is_transient
from orchestrator.worker.attempts import Attempts
from orchestrator.worker.execution import describe
from orchestrator.worker.report import log_recorded
from orchestrator.worker.state import WorkerState

ONE_TRANSACTION_CLAIMS = 16
"""Most sagas an idle worker claims and saves in one transaction (it holds the events table's
lock while it decides them)."""
Intent = Callable[[SagaAggregate], Work | None]
Fallback = Callable[[str], Intent]
"""Given why an outcome could not be stored, the intent that records that instead."""


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


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


@dataclass
class Decided:
    """The jobs of a batch applied: each saga with the attempt it claimed, and those to set aside
    (saga, version, problem, error)."""

    results: dict[UUID, tuple[SagaAggregate, Work | None]] = field(default_factory=dict)
    failures: list[tuple[UUID, int, str, BaseException | None]] = field(default_factory=list)


class DecisionFailed(Exception):
    """An intent raised while deciding a saga's next step (its plan and its code disagree, say)."""

    def __init__(self, version: int, error: Exception) -> None:
        super().__init__(f"deciding its next step failed: {describe(error)}")
        self.version = version
        self.error = error


class Bookkeeper:
    """Applies intents to sagas and records them, many per transaction; starts what they claimed."""

    def __init__(self, state: WorkerState, repository: Repository, registry: Registry, attempts: Attempts) -> None:
        self.state = state
        self.repository = repository
        self.registry = registry
        self.attempts = attempts
        self.look_at = float("inf")
        """Monotonic time when a retry or timeout just recorded falls due (the loop looks then)."""

    # Intents

    def advance(self) -> Intent:
        """Record every decision due now and claim the next attempt (none once stopping)."""

        def intent(aggregate: SagaAggregate) -> Work | None:
            return aggregate.advance(
                utcnow(),
                self.state.worker_id,
                self.state.lease,
                self.registry.policies[aggregate.run.saga],
                claim=not self.state.stopping.is_set(),
            )

        return intent

    def outcome(self, work: Work, outcome: Outcome) -> Job:
        """Record ``outcome`` of ``work`` (if still ours), then advance; a failure if it cannot be stored."""
        advance = self.advance()

        def intent(aggregate: SagaAggregate, outcome: Outcome = outcome) -> Work | None:
            policies = self.registry.policies[aggregate.run.saga]
            if not aggregate.record_outcome(work, outcome, utcnow(), policies):
                return None  # no longer ours: the lease expired and another worker took over
            return advance(aggregate)

        def fallback(reason: str) -> Intent:
            failed = Outcome(error=f"the attempt's outcome could not be stored: {reason}", retryable=False)
            return lambda aggregate: intent(aggregate, failed)

        return Job(None, intent, fallback)

    # Claims and outcomes

    def claim(self, limit: int) -> int:
        """Lease up to ``limit`` due sagas, record what is due for each in one save, start their attempts.

        An idle worker whose storage can (PostgreSQL) claims and saves in one transaction when
        no other writer holds the events table: a saga's first step starts one commit sooner.
        Should that transaction fail, it is undone whole and the claim is made again in two,
        where trouble costs only the saga that has it.
        """
        now = utcnow()
        lease_until = now + timedelta(seconds=self.state.lease)
        index = self.repository.index
        self.state.stats["claims"] += 1
        metrics.CLAIMS.inc()
        if index.claims_with_save and not self.attempts.running:
            claimed = self._claim_recorded(now, lease_until, min(limit, ONE_TRANSACTION_CLAIMS))
            if claimed is not None:
                return claimed
        return self._record_claims(*index.claim_loaded(self.state.worker_id, now, lease_until, limit))

    def _record_claims(self, claims: list[Claim], records: list[StoredEvent]) -> int:
        """Record what is due for each claimed saga in one save (the claim committed already)."""
        metrics.CLAIMED.inc(len(claims))
        if not claims:
            return 0
        batch, later = self._jobs(claims, records)
        for action in later:
            action()
        self.commit(batch)
        return len(claims)

    def _jobs(self, claims: list[Claim], records: list[StoredEvent]) -> tuple[Batch, list[Callable[[], None]]]:
        """What to record for each claimed saga, and what to do instead, once no transaction is open,
        for those that cannot run here now (touching their rows within one would wait on itself)."""
        batch = Batch()
        later: list[Callable[[], None]] = []
        aggregates, broken = self.repository.fold_each(records)
        for claim in claims:
            uuid = claim.saga_uuid
            aggregate = aggregates.get(uuid)
            if self.attempts.busy(uuid):
                # Still running here (a stalled round let its lease lapse), or a timed-out thread of it
                # has not returned: never run two attempts of one saga at once; look again shortly.
                soon = utcnow() + timedelta(seconds=self.state.poll_interval)
                due = aggregate.run.due_at if aggregate is not None else None
                later.append(functools.partial(self.release_row, uuid, claim.version, max(soon, due or soon)))
                continue
            if uuid in broken:
                later.append(functools.partial(self.set_aside, uuid, claim.version, broken[uuid][1]))
                continue
            if aggregate is None:  # pragma: no cover - a row always follows its events
                continue
            if aggregate.run.saga not in self.registry:
                self.state.log.error("saga not registered in this worker", saga=aggregate.run.saga)
                continue  # the lease expires and a worker that knows the saga takes it
            batch.jobs[uuid] = Job(aggregate, self.advance())
        return batch, later

    def _claim_recorded(self, now: datetime, lease_until: datetime, limit: int) -> int | None:
        """Claim and save in one transaction; how many sagas it claimed (``None``: it was undone)."""
        found: list[tuple[list[Claim], list[Callable[[], None]], Decided]] = []

        def record(claims: list[Claim], records: list[StoredEvent]) -> tuple[list[StoredEvent], list[IndexEntry]]:
            batch, later = self._jobs(claims, records)
            decided = self._decide_all(batch, load=False)
            found.append((claims, later, decided))
            return self.repository.stored([a for a, _ in decided.results.values() if a.pending_events])

        try:
            apart = self.repository.index.claim_recorded(self.state.worker_id, now, lease_until, limit, record)
        except Exception as error:
            if is_transient(error) and not isinstance(error, IntegrityError):
                raise
            self.state.stats["batch_errors"] += 1
            self.state.log.warning("claim and save in one transaction failed; claiming again", error=describe(error))
            return None
        if apart is not None:  # claimed, but the events table was busy: save apart
            return self._record_claims(*apart)
        claims, later, decided = found[0]
        metrics.CLAIMED.inc(len(claims))
        recorded: dict[UUID, list[Any]] = {}
        for aggregate, _ in decided.results.values():
            if aggregate.pending_events:
                recorded[aggregate.id] = list(aggregate.collect_events())
        for action in later:  # (the save was the claim's own transaction: no second one to count)
            action()
        for failure in decided.failures:
            self.set_aside(*failure)
        self._finish(decided.results, recorded)
        return len(claims)

    def record_finished(self) -> int:
        """Record the outcomes of finished (or timed-out) attempts, many sagas per save."""
        ended = self.attempts.finished()
        if not ended:
            return 0
        batch = Batch()
        for uuid, running in ended.items():
            assert running.outcome is not None
            job = self.outcome(running.work, running.outcome)
            job.aggregate = None if running.stale else running.aggregate
            batch.jobs[uuid] = job
        try:
            self.commit(batch)
        except Exception:
            # Outcomes stay in hand for the next round; the aggregates, changed in memory by a
            # save that failed, are reloaded then (a failed save leaves them unusable).
            for running in ended.values():
                running.stale = True
            raise
        for uuid, running in ended.items():
            if self.attempts.running.get(uuid) is running:  # not replaced by the saga's next attempt
                del self.attempts.running[uuid]
        return len(ended)

    # Recording

    def commit(self, batch: Batch) -> None:
        """Apply every job and save them all in one transaction; on trouble, one saga at a time.

        Whatever goes wrong with one saga (its history does not load, its intent raises, its
        events or status cannot be stored) is confined to it: the others are recorded without it.
        """
        decided = self._decide_all(batch)
        for failure in decided.failures:
            self.set_aside(*failure)
        aside = {failure[0] for failure in decided.failures}
        results = decided.results
        changed = [aggregate for aggregate, _ in results.values() if aggregate.pending_events]
        recorded = {a.id: list(a.pending_events) for a in changed}
        try:
            if changed:
                self.state.stats["saves"] += 1
                self.repository.save(changed, wake=False)
        except Exception as error:
            if not isinstance(error, IntegrityError) and is_transient(error):
                raise
            # A conflict (someone else wrote to one of these sagas) or one saga's data that the
            # database refused: the batch is void. Redo each saga alone, from a fresh load.
            self.state.stats["conflicts" if isinstance(error, IntegrityError) else "batch_errors"] += 1
            metrics.CONFLICTS.inc()
            results, recorded = {}, {}
            for uuid, job in batch.jobs.items():
                redone = None if uuid in aside else self.commit_one(uuid, job)
                if redone is not None:
                    results[uuid] = (redone[0], redone[1])
                    recorded[uuid] = redone[2]
        self._finish(results, recorded)

    def _decide_all(self, batch: Batch, *, load: bool = True) -> Decided:
        """Apply every job's intent (loading the sagas not in hand, unless ``load`` is false); the
        sagas that cannot be loaded or decided are returned as failures, to set aside."""
        stale = [uuid for uuid, job in batch.jobs.items() if job.aggregate is None]
        fresh, broken = self.repository.load_many(stale) if load else ({}, {})
        decided = Decided()
        for uuid, job in batch.jobs.items():
            if uuid in broken:
                decided.failures.append((uuid, *broken[uuid], None))
                continue
            aggregate = job.aggregate or fresh.get(uuid)
            if aggregate is None:  # pragma: no cover - jobs without an aggregate are always loaded
                continue
            try:
                work = self._decide(job.intent, aggregate)
            except DecisionFailed as failure:
                decided.failures.append((uuid, failure.version, str(failure), failure.error))
                continue
            # A reloaded saga may show an attempt whose claim this worker saved in a round that then
            # failed (the commit landed, its acknowledgement was lost): run it.
            decided.results[uuid] = (aggregate, work or (None if aggregate.pending_events else self.adopt(aggregate)))
        return decided

    def _finish(self, results: dict[UUID, tuple[SagaAggregate, Work | None]], recorded: dict[UUID, list[Any]]) -> None:
        """After a save: log what it recorded, hand back rows with nothing due, start the attempts claimed."""
        for uuid, events in recorded.items():
            log_recorded(self.state.log, results[uuid][0], events, self.attempts.running.get(uuid))
        for uuid, (aggregate, work) in results.items():
            if not recorded.get(uuid) and work is None and uuid not in self.attempts.running:
                self.release(aggregate)  # claimed, but nothing was due: hand the row back
            due = aggregate.run.due_at
            if work is None and due is not None:  # a retry or timeout: look again when it falls due
                self.look_at = min(self.look_at, time.monotonic() + max(0.0, (due - utcnow()).total_seconds()))
            if work is not None:
                self.attempts.start(aggregate, work)

    def commit_one(self, uuid: UUID, job: Job) -> tuple[SagaAggregate, Work | None, list[Any]] | None:
        """Apply ``job`` to a fresh load of one saga and save it, with the events it recorded
        (none: nothing changed); ``None`` if it could not be recorded (the saga is set aside)."""
        intent, fallback = job.intent, job.fallback
        while True:
            try:
                update = self.repository.update(uuid, functools.partial(self._decide, intent), wake=False)
            except (HistoryUnloadable, Conflicted) as failure:
                self.set_aside(uuid, failure.version, str(failure))
                return None
            except DecisionFailed as failure:
                self.set_aside(uuid, failure.version, str(failure), failure.error)
                return None
            except Exception as error:
                if is_transient(error):
                    raise
                if fallback is None:
                    version = self._version(uuid)
                    self.set_aside(uuid, version, f"its events cannot be stored: {describe(error)}", error)
                    return None
                # The outcome itself may be what the database refuses: record its failure instead.
                intent, fallback = fallback(describe(error)), None
                continue
            self.state.stats["saves"] += 1 if update.events else 0
            work = update.result if update.events else update.result or self.adopt(update.aggregate)
            return update.aggregate, work, update.events

    def _decide(self, intent: Intent, aggregate: SagaAggregate) -> Work | None:
        version = aggregate.version - len(aggregate.pending_events)
        try:
            return intent(aggregate)
        except Exception as error:
            raise DecisionFailed(version, error) from error

    def _version(self, uuid: UUID) -> int:
        loaded, _ = self.repository.load_many([uuid])
        return loaded[uuid].version if uuid in loaded else 0

    def set_aside(self, uuid: UUID, version: int, problem: str, error: BaseException | None = None) -> None:
        """Rest a saga that cannot be loaded or recorded, with backoff; never retry it in a hot loop."""
        self.state.stats["set_aside"] += 1
        self.attempts.forget(uuid)
        problem = clean_error(problem)
        try:
            due_at = self.repository.index.set_aside(uuid, version, problem, utcnow())
        except Exception as failure:
            if is_transient(failure):
                raise
            # Its lease runs out, and a later claim tries again.
            self.state.log.exception("could not set a saga aside", saga_uuid=str(uuid), problem=problem)
            return
        self.state.log.error(
            "saga set aside",
            saga_uuid=str(uuid),
            problem=problem,
            retry_at=due_at.isoformat() if due_at else None,
            exc_info=error,
        )

    def adopt(self, aggregate: SagaAggregate) -> Work | None:
        """The attempt this worker recorded itself, if the save that did so reported a conflict.

        A commit whose acknowledgement was lost is retried by the library and then reported as a
        conflict although it landed: the reloaded saga shows our own claim, which we must run.
        """
        flight = aggregate.run.in_flight
        if flight is None or flight.worker != self.state.worker_id:
            return None
        work = Work(aggregate.id, flight.kind, flight.name, flight.attempt)
        running = self.attempts.running.get(aggregate.id)
        if (running is not None and running.work == work) or aggregate.id in self.attempts.abandoned:
            return None  # that very attempt is running here already
        return work

    def release(self, aggregate: SagaAggregate, due_at: datetime | None = None) -> None:
        """Hand a claimed row back, due when the saga says (or at ``due_at``)."""
        self.release_row(aggregate.id, aggregate.version, due_at or aggregate.run.due_at)

    def release_row(self, uuid: UUID, version: int, due_at: datetime | None) -> None:
        """Hand a claimed row back by key, if it is still at ``version``."""
        self.state.stats["releases"] += 1
        self.repository.index.release(uuid, version, due_at)
