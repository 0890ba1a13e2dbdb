"""The events that end a saga, one per terminal state."""

from __future__ import annotations

from orchestrator.events.base import SagaEvent
from orchestrator.machine import SagaRun
from orchestrator.states import SagaState


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
