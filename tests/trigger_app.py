"""The app of the trigger crash test: ``saga worker --app tests.trigger_app:app``."""

from __future__ import annotations

from orchestrator import Orchestrator
from tests.test_triggers import ExpenseApproval


def app() -> Orchestrator:
    """The triggered saga on the database named by SAGA_DATABASE_URL."""
    return Orchestrator(sagas=[ExpenseApproval])
