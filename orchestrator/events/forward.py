"""The events of a saga going forwards: its start, its steps' attempts, its waits and the events sent to it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import CanInitAggregate
from pydantic import Field

from orchestrator.events.base import SagaEvent, StepEvent
from orchestrator.machine import InFlight, NodeRun, PlanNode, SagaRun
from orchestrator.states import SagaState, StepState


class SagaStarted(SagaEvent, CanInitAggregate[UUID]):
    """A saga was started with this input; ``start_at`` delays its first step."""

    originator_topic: str
    saga_id: str
    saga: str
    input: dict[str, Any]
    plan: list[PlanNode]
    start_at: datetime | None = None
    search: dict[str, Any] = Field(default_factory=dict)
    """The input fields the saga class declares searchable (``search = [...]``), with their values."""
    notify: str | None = None
    """A URL to POST the final status to once the saga ends."""
    pool: str | None = None
    """The pool whose limits it runs under: it is queued until the pool admits it."""
    pool_key: str = ""
    queued: str | None = None
    """Why it waits (the pool's limits, in words)."""

    def apply(self, aggregate: Any) -> None:
        aggregate.run = SagaRun(
            saga_id=self.saga_id,
            saga=self.saga,
            input=self.input,
            nodes=[NodeRun(node) for node in self.plan],
            created_at=self.timestamp,
            updated_at=self.timestamp,
            due_at=self.start_at or self.timestamp,
            search=self.search,
            notify=self.notify,
            pool=self.pool,
            pool_key=self.pool_key,
            queued=self.queued if self.pool is not None else None,
            queue_reason=self.queued if self.pool is not None else None,
        )


class SagaAdmitted(SagaEvent):
    """The saga's pool let it in: its first step is due (at ``start_at``, if that lies ahead)."""

    def evolve(self, run: SagaRun) -> None:
        run.queued, run.admitted = None, True


class StepStarted(StepEvent):
    """A worker claimed an attempt of a step until ``lease_until``."""

    lease_until: datetime
    worker: str

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.state, node.attempts = StepState.RUNNING, self.attempt
        run.in_flight = InFlight("step", self.name, self.attempt, self.lease_until, self.worker)
        run.state, run.due_at = SagaState.RUNNING, self.lease_until


class LeaseRenewed(StepEvent):
    """The worker running a long attempt extended its lease."""

    lease_until: datetime

    def evolve(self, run: SagaRun) -> None:
        if run.in_flight is not None:
            run.in_flight.lease_until = self.lease_until
            run.due_at = self.lease_until


class DomainEventEmitted(StepEvent):
    """A step emitted a domain event, recorded atomically with its success."""

    event: str
    data: dict[str, Any]


class StepSucceeded(StepEvent):
    """An attempt of a step returned ``result``."""

    result: Any = None

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.state, node.last_error = StepState.SUCCEEDED, None
        run.results[self.name] = self.result
        run.in_flight, run.due_at = None, self.timestamp
        if not run.compensating:
            run.cursor = run.nodes.index(node) + 1
            run.pass_received_waits()


class AttemptFailed(StepEvent):
    """Base of the events of a failed attempt: its error, and where an unexpected exception was
    raised (not for ``NonRetryable`` or a timeout)."""

    error: str
    traceback: str | None = None


class Retrying(AttemptFailed):
    """Base of an attempt failure that will be retried at ``retry_at``."""

    retry_at: datetime

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).last_error = self.error
        run.in_flight, run.due_at = None, self.retry_at


class StepAttemptFailed(Retrying):
    """An attempt of a step failed; the next one is due at ``retry_at``."""


class StepFailed(AttemptFailed):
    """A step failed for good: the saga turns to compensation."""

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.state, node.last_error = StepState.FAILED, self.error
        run.in_flight = None
        run.error = f"step {self.name!r} failed: {self.error}"
        run.start_compensating(self.timestamp)


class WaitStarted(StepEvent):
    """The saga parked on a wait for ``event`` until ``timeout_at`` (no worker busy)."""

    event: str
    timeout_at: datetime | None = None

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).state = StepState.RUNNING
        run.waiting_for, run.wait_until = self.event, self.timeout_at
        run.state, run.due_at = SagaState.WAITING, self.timeout_at


class EventReceived(SagaEvent):
    """``send`` delivered ``event``; consumed now or when the saga reaches its wait."""

    event: str
    data: dict[str, Any]

    def evolve(self, run: SagaRun) -> None:
        run.received[self.event] = self.data
        if run.waiting_for == self.event:
            run.waiting_for = run.wait_until = None
            run.state, run.due_at = SagaState.RUNNING, self.timestamp
        if run.in_flight is None and not run.compensating:
            run.pass_received_waits()  # also a wait the saga stands at but has not parked on yet


class WaitTimedOut(StepEvent):
    """A wait's timeout passed before its event came."""

    event: str
    on_timeout: str

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.last_error = f"timed out waiting for {self.event!r}"
        run.waiting_for = run.wait_until = None
        if self.on_timeout == "continue":
            node.state = StepState.SUCCEEDED
            run.cursor = run.nodes.index(node) + 1
            run.state, run.due_at = SagaState.RUNNING, self.timestamp
            run.pass_received_waits()
        else:
            node.state = StepState.FAILED
            run.error = node.last_error
            run.start_compensating(self.timestamp)
