"""The saga's events: pydantic models stored by the eventsourcing library.

Each event's ``evolve`` is its part of the fold; it must stay deterministic (no clock,
no I/O, no randomness) because it runs again on every replay. Topics are explicit so
moving a class never orphans stored events.
"""

from orchestrator.events.base import SagaEvent, StepEvent
from orchestrator.events.forward import (
    AttemptFailed,
    DomainEventEmitted,
    EventReceived,
    LeaseRenewed,
    Retrying,
    SagaAdmitted,
    SagaStarted,
    StepAttemptFailed,
    StepFailed,
    StepStarted,
    StepSucceeded,
    WaitStarted,
    WaitTimedOut,
)
from orchestrator.events.mapper import PydanticMapper
from orchestrator.events.terminal import TERMINAL_EVENTS, SagaCancelled, SagaCompensated, SagaCompleted, SagaFailed
from orchestrator.events.undo import (
    CancelRequested,
    CompensationAttemptFailed,
    CompensationFailed,
    CompensationResolved,
    CompensationStarted,
    CompensationSucceeded,
    SagaRetried,
    SagaTerminated,
)

__all__ = [
    "AttemptFailed",
    "CancelRequested",
    "CompensationAttemptFailed",
    "CompensationFailed",
    "CompensationResolved",
    "CompensationStarted",
    "CompensationSucceeded",
    "DomainEventEmitted",
    "EventReceived",
    "LeaseRenewed",
    "PydanticMapper",
    "Retrying",
    "SagaCancelled",
    "SagaCompensated",
    "SagaCompleted",
    "SagaEvent",
    "SagaFailed",
    "SagaRetried",
    "SagaAdmitted",
    "SagaStarted",
    "SagaTerminated",
    "StepAttemptFailed",
    "StepEvent",
    "StepFailed",
    "StepStarted",
    "StepSucceeded",
    "TERMINAL_EVENTS",
    "WaitStarted",
    "WaitTimedOut",
]
