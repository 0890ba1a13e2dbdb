"""sagaworks: durable sagas for Python, built on event sourcing."""

from orchestrator.app import Orchestrator
from orchestrator.definition import Saga, step, wait_for
from orchestrator.errors import (
    ConfigurationError,
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    NonRetryable,
    OrchestratorError,
    SagaAlreadyStarted,
    SagaNotFound,
    UnexpectedEvent,
    UnknownSaga,
)
from orchestrator.retry import RetryPolicy
from orchestrator.settings import Settings
from orchestrator.status import HistoryEvent, SagaState, SagaStatus, StepState, StepStatus

__all__ = [
    "ConfigurationError",
    "DefinitionError",
    "HistoryEvent",
    "InvalidInput",
    "InvalidTransition",
    "NonRetryable",
    "Orchestrator",
    "OrchestratorError",
    "RetryPolicy",
    "Saga",
    "SagaAlreadyStarted",
    "SagaNotFound",
    "SagaState",
    "SagaStatus",
    "Settings",
    "StepState",
    "StepStatus",
    "UnexpectedEvent",
    "UnknownSaga",
    "step",
    "wait_for",
]
