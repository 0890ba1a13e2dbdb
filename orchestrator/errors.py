"""The error hierarchy: every error the engine raises on purpose is an ``OrchestratorError``."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of the errors raised by sagaworks."""


class DefinitionError(OrchestratorError, TypeError):
    """A saga class is badly defined (raised when the class is created or registered)."""


class ConfigurationError(OrchestratorError, ValueError):
    """A setting (database URL, worker option) is invalid."""


class UnknownSaga(OrchestratorError, LookupError):
    """The saga class or name is not registered with this orchestrator."""


class SagaNotFound(OrchestratorError, LookupError):
    """No saga with this id has been started."""


class ScheduleNotFound(OrchestratorError, LookupError):
    """No schedule with this id was created."""


class SagaAlreadyStarted(OrchestratorError):
    """A saga with this id was already started, with a different saga or input."""


class InvalidInput(OrchestratorError, ValueError):
    """The input does not validate against the saga's input model."""


class UnexpectedEvent(OrchestratorError):
    """The saga is not waiting for this event (unknown, already delivered, or finished)."""


class UnknownEvent(OrchestratorError, LookupError):
    """No domain event of that name is known to this orchestrator."""


class InvalidTransition(OrchestratorError):
    """The operation does not apply to the saga in its current state (e.g. retry of a completed saga)."""


class StorageError(OrchestratorError):
    """The database refused an operation (read-only, full, a constraint) or could not be reached."""

    transient = False
    """Whether trying again later may succeed (a database that is briefly away, a lock timeout)."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or is busy right now; trying again later may succeed."""

    transient = True


class NonRetryable(Exception):
    """Raised by a step or compensation to fail for good now, without further retries."""
