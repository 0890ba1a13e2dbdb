"""The orchestrator the CLI tests load with ``--app tests.cli_app:app``."""

from __future__ import annotations

from orchestrator import Orchestrator
from tests.test_smoke import Ship


def app() -> Orchestrator:
    """The test sagas on the database named by SAGA_DATABASE_URL."""
    return Orchestrator(sagas=[Ship])
