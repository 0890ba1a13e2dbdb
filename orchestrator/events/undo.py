"""The events of a saga turning back: cancellation, compensations, an operator's retry, resolve or end."""

from __future__ import annotations

from datetime import datetime

from orchestrator.events.base import SagaEvent, StepEvent
from orchestrator.events.forward import AttemptFailed, Retrying
from orchestrator.machine import InFlight, SagaRun
from orchestrator.states import SagaState, StepState


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
        run.queued = None  # a queued saga leaves its queue without a slot: nothing of it ran
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


class CompensationAttemptFailed(Retrying):
    """An attempt of a compensation failed; the next one is due at ``retry_at``."""


class CompensationFailed(AttemptFailed):
    """A compensation failed for good: the saga will end ``failed`` until ``retry``."""

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
        run.requeue()


class CompensationResolved(StepEvent):
    """An operator undid a step by hand whose compensation had failed; the rest of the undo goes on."""

    reason: str | None = None

    def evolve(self, run: SagaRun) -> None:
        node = run.node(self.name)
        node.state, node.compensation_failed = StepState.COMPENSATED, False
        node.last_error = "compensated by hand" + (f": {self.reason}" if self.reason else "")
        run.state, run.due_at, run.error = SagaState.COMPENSATING, self.timestamp, run.cause
        run.requeue()


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
