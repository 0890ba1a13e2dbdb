"""sagaworks: durable sagas for Python, built on event sourcing."""

from orchestrator.client import Orchestrator
from orchestrator.definition import Saga, step, wait_for
from orchestrator.domain import ChangeTrigger, DomainEvent, EventInfo, SagaEnded, Trigger, on, on_change
from orchestrator.errors import (
    ConfigurationError,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    NonRetryable,
    OrchestratorError,
    SagaAlreadyStarted,
    SagaNotFound,
    ScheduleNotFound,
    StorageError,
    StorageUnavailable,
    UnexpectedEvent,
    UnknownEvent,
    UnknownSaga,
)
from orchestrator.limits import Limits
from orchestrator.readmodels import HistoryEvent, SagaStatus, StepStatus
from orchestrator.retry import RetryPolicy
from orchestrator.schedules import ScheduleSpec, cron, every, once
from orchestrator.settings import Settings
from orchestrator.states import SagaState, StepState

__all__ = [
    "ConfigurationError",
    "DomainEvent",
    "EventInfo",
    "SagaEnded",
    "Trigger",
    "UnknownEvent",
    "on",
    "on_change",
    "ChangeTrigger",
    "DefinitionError",
    "HistoryEvent",
    "InvalidInput",
    "InvalidTransition",
    "Limits",
    "NonRetryable",
    "Orchestrator",
    "OrchestratorError",
    "RetryPolicy",
    "Saga",
    "SagaAlreadyStarted",
    "SagaNotFound",
    "ScheduleNotFound",
    "ScheduleSpec",
    "cron",
    "every",
    "once",
    "SagaState",
    "SagaStatus",
    "Settings",
    "StepState",
    "StepStatus",
    "StorageError",
    "StorageUnavailable",
    "UnexpectedEvent",
    "UnknownSaga",
    "step",
    "wait_for",
]
