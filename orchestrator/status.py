"""What callers read about a saga: ``SagaStatus``, its states, and ``history()`` entries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


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


class StepStatus(BaseModel):
    """One step of a saga as the status shows it, in declaration order."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: StepState
    attempts: int = 0
    last_error: str | None = None
    kind: str = "step"
    compensation_attempts: int = 0


class SagaStatus(BaseModel):
    """A saga's state as the status projection serves it."""

    model_config = ConfigDict(frozen=True)

    saga_id: str
    saga: str
    version: int
    state: SagaState
    current_step: str | None
    steps: list[StepStatus]
    result: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime
    due_at: datetime | None = None
    waiting_for: str | None = None
    problem: str | None = None
    """Why workers have set the saga aside (its history cannot be loaded or saved), if they have."""


class HistoryEvent(BaseModel):
    """One event of a saga's history, as ``history()`` returns it."""

    model_config = ConfigDict(frozen=True)

    type: str
    version: int
    timestamp: datetime
    step: str | None = None
    data: dict[str, Any]
