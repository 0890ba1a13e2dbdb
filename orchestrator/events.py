"""The saga's events: pydantic models stored by the eventsourcing library.

Each event's ``evolve`` is its part of the fold; it must stay deterministic (no clock,
no I/O, no randomness) because it runs again on every replay. Topics are explicit so
moving a class never orphans stored events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

import orjson
from eventsourcing.domain import CanInitAggregate, CanMutateAggregate
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import register_topic, resolve_topic
from pydantic import BaseModel, ConfigDict

from orchestrator.machine import InFlight, NodeRun, PlanNode, SagaRun
from orchestrator.status import SagaState, StepState


class SagaEvent(BaseModel, CanMutateAggregate[UUID]):
    """Base of every saga event."""

    model_config = ConfigDict(frozen=True)
    topic: ClassVar[str] = ""

    originator_id: UUID
    originator_version: int
    timestamp: datetime

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.topic = f"sagaworks.{cls.__name__}.v1"
        register_topic(cls.topic, cls)

    def apply(self, aggregate: Any) -> None:
        run: SagaRun = aggregate.run
        self.evolve(run)
        run.version = self.originator_version
        run.updated_at = self.timestamp

    def evolve(self, run: SagaRun) -> None:
        """Change ``run`` as this event says."""

    @property
    def step(self) -> str | None:
        """The step or wait this event is about, if any."""
        return None


class StepEvent(SagaEvent):
    """An event about one attempt of a step or a compensation."""

    name: str
    attempt: int = 0

    @property
    def step(self) -> str | None:
        return self.name


class SagaStarted(SagaEvent, CanInitAggregate[UUID]):
    """A saga was started with this input; ``start_at`` delays its first step."""

    originator_topic: str
    saga_id: str
    saga: str
    input: dict[str, Any]
    plan: list[PlanNode]
    start_at: datetime | None = None

    def apply(self, aggregate: Any) -> None:
        aggregate.run = SagaRun(
            saga_id=self.saga_id,
            saga=self.saga,
            input=self.input,
            nodes=[NodeRun(node) for node in self.plan],
            created_at=self.timestamp,
            updated_at=self.timestamp,
            due_at=self.start_at or self.timestamp,
        )


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


class StepAttemptFailed(StepEvent):
    """An attempt of a step failed; the next one is due at ``retry_at``."""

    error: str
    retry_at: datetime
    traceback: str | None = None
    """Where an unexpected exception was raised (not for ``NonRetryable`` or a timeout)."""

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).last_error = self.error
        run.in_flight, run.due_at = None, self.retry_at


class StepFailed(StepEvent):
    """A step failed for good: the saga turns to compensation."""

    error: str
    traceback: str | None = None

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


class CancelRequested(SagaEvent):
    """An operator cancelled the saga: what was done is undone, then it ends ``cancelled``."""

    reason: str | None = None

    def evolve(self, run: SagaRun) -> None:
        if run.waiting_for is not None:
            run.nodes[run.cursor].state = StepState.PENDING
        for node in run.nodes:
            # A step between retries will not be tried again: it ends failed, not running.
            if node.state is StepState.RUNNING and (run.in_flight is None or run.in_flight.name != node.plan.name):
                node.state = StepState.FAILED
        run.cancel_requested = True
        run.error = "cancelled" + (f": {self.reason}" if self.reason else "")
        run.start_compensating(self.timestamp)


class CompensationStarted(StepEvent):
    """A worker claimed an attempt of a compensation until ``lease_until``."""

    lease_until: datetime
    worker: str

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).compensation_attempts = self.attempt
        run.in_flight = InFlight("compensation", self.name, self.attempt, self.lease_until, self.worker)
        run.due_at = self.lease_until


class CompensationSucceeded(StepEvent):
    """A compensation undid its step."""

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).state = StepState.COMPENSATED
        run.in_flight, run.due_at = None, self.timestamp


class CompensationAttemptFailed(StepEvent):
    """An attempt of a compensation failed; the next one is due at ``retry_at``."""

    error: str
    retry_at: datetime
    traceback: str | None = None

    def evolve(self, run: SagaRun) -> None:
        run.node(self.name).last_error = self.error
        run.in_flight, run.due_at = None, self.retry_at


class CompensationFailed(StepEvent):
    """A compensation failed for good: the saga will end ``failed`` until ``retry``."""

    error: str
    traceback: str | None = None

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.compensation_failed, node.last_error = True, self.error
        run.in_flight, run.due_at = None, self.timestamp
        run.error = f"compensation of {self.name!r} failed: {self.error}"


class SagaRetried(SagaEvent):
    """An operator resumed a failed saga: the failed compensation runs again."""

    def evolve(self, run: SagaRun) -> None:
        for node in run.nodes:
            if node.compensation_failed:
                # Numbers go on from the last attempt, so a hung worker's late outcome for an
                # old attempt can never be mistaken for the new one's.
                node.compensation_failed, node.compensation_base = False, node.compensation_attempts
        run.state, run.due_at, run.error = SagaState.COMPENSATING, self.timestamp, run.cause


class CompensationResolved(StepEvent):
    """An operator undid a step by hand whose compensation had failed; the rest of the undo goes on."""

    reason: str | None = None

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.state, node.compensation_failed = StepState.COMPENSATED, False
        node.last_error = "compensated by hand" + (f": {self.reason}" if self.reason else "")
        run.state, run.due_at, run.error = SagaState.COMPENSATING, self.timestamp, run.cause


class SagaTerminated(SagaEvent):
    """An operator ended the saga where it stood, running nothing more: no step, no compensation."""

    reason: str | None = None

    def evolve(self, run: SagaRun) -> None:
        for node in run.nodes:
            if node.state is StepState.RUNNING:
                node.state = StepState.FAILED
        run.in_flight = None
        run.waiting_for = run.wait_until = None
        run.state, run.due_at = SagaState.CANCELLED, None
        run.error = "cancelled without compensation" + (f": {self.reason}" if self.reason else "")


class SagaCompleted(SagaEvent):
    """Every step succeeded."""

    def evolve(self, run: SagaRun) -> None:
        run.state, run.due_at, run.error = SagaState.COMPLETED, None, None


class SagaCompensated(SagaEvent):
    """A step failed for good and every completed step with a compensation was undone."""

    def evolve(self, run: SagaRun) -> None:
        run.state, run.due_at = SagaState.COMPENSATED, None


class SagaCancelled(SagaEvent):
    """The saga was cancelled and what it had done was undone."""

    def evolve(self, run: SagaRun) -> None:
        run.state, run.due_at = SagaState.CANCELLED, None


class SagaFailed(SagaEvent):
    """A compensation failed for good; the steps before it in reverse order are not undone."""

    error: str

    def evolve(self, run: SagaRun) -> None:
        run.state, run.due_at, run.error = SagaState.FAILED, None, self.error


TERMINAL_EVENTS: dict[SagaState, type[SagaEvent]] = {
    SagaState.COMPLETED: SagaCompleted,
    SagaState.COMPENSATED: SagaCompensated,
    SagaState.CANCELLED: SagaCancelled,
    SagaState.FAILED: SagaFailed,
}


class PydanticMapper(Mapper[UUID]):
    """Stores events as plain JSON (``model_dump(mode="json")``) and validates them on the way back."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        state = domain_event.model_dump(mode="json", exclude={"originator_id", "originator_version"})
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=type(domain_event).topic,
            state=orjson.dumps(state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        cls: type[BaseModel] = resolve_topic(stored_event.topic)
        state = orjson.loads(stored_event.state)
        state["originator_id"] = stored_event.originator_id
        state["originator_version"] = stored_event.originator_version
        return cls.model_validate(state)
