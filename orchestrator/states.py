"""Where a saga and each of its steps are: the states the core folds and callers read."""

from __future__ import annotations

from enum import StrEnum


class SagaState(StrEnum):
    """Where a saga is in its life; the last four are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Whether nothing more happens to the saga (``retry`` aside, for ``failed``)."""
        return self in TERMINAL


TERMINAL = frozenset({SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.CANCELLED, SagaState.FAILED})


class StepState(StrEnum):
    """Where one step (or wait) is: never run, in progress, done, failed for good, or undone."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATED = "compensated"
