"""The saga catalogue: an expense claim with manager approval, a trip booking, an order fulfilment.

The sagas call the fake services of ``sagas.services``, which can inject faults; ``saga demo``,
the README and the tests use them. Nothing is registered by importing this package: pass
``CATALOGUE`` to an ``Orchestrator``, or let ``app()`` build one (``saga worker --app sagas:app``).
"""

from __future__ import annotations

from typing import Any

from orchestrator import Orchestrator, Saga
from sagas.expense import Expense, ExpenseClaim
from sagas.orders import FulfilOrder, Item, Order
from sagas.reports import ApprovedExpenses
from sagas.trip import BookTrip, Trip

CATALOGUE: list[type[Saga[Any]]] = [ExpenseClaim, BookTrip, FulfilOrder]
"""Every saga of the catalogue."""


def build_orchestrator(database: str | None = None) -> Orchestrator:
    """An orchestrator for the catalogue and its read models; ``database`` defaults to ``SAGA_DATABASE_URL``."""
    return Orchestrator(sagas=CATALOGUE, database=database, projections=[ApprovedExpenses()])


def app() -> Orchestrator:
    """The catalogue's orchestrator configured from the environment: ``--app sagas:app``."""
    return build_orchestrator()


__all__ = [
    "CATALOGUE",
    "build_orchestrator",
    "app",
    "ExpenseClaim",
    "Expense",
    "BookTrip",
    "Trip",
    "FulfilOrder",
    "Order",
    "Item",
    "ApprovedExpenses",
]
