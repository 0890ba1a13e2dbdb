"""Read models the engine keeps itself: saga status (inline with the events) and history entries."""

from orchestrator.readmodels.history import HistoryEvent, history_entries
from orchestrator.readmodels.status import SagaStatus, StepStatus, index_entry, status_document, status_of

__all__ = ["HistoryEvent", "SagaStatus", "StepStatus", "history_entries", "index_entry", "status_document", "status_of"]
