"""The saga catalogue: an expense claim with manager approval (started by a domain event too, at
most ten per employee at once), a trip booking, an order fulfilment, a customer onboarding started
by another application's events, a weekday report on a schedule and the nightly clean-up.

The sagas call the fake services of ``sagas.services``, which can inject faults; ``saga demo``,
the README and the tests use them. Nothing is registered by importing this package: pass
``CATALOGUE`` to an ``Orchestrator``, or let ``app()`` build one (``saga worker --app sagas:app``).
"""

from __future__ import annotations

from typing import Any

from orchestrator import Orchestrator, Saga
from orchestrator.changes import open_upstream
from orchestrator.settings import Settings
from orchestrator.storage import parse_database_url
from sagas.customers import Customer, Customers, NewCustomer, Onboarding
from sagas.expense import ClaimSubmitted, Expense, ExpenseClaim
from sagas.orders import FulfilOrder, Item, Order
from sagas.reports import ApprovedExpenses, ExpenseReport, NightlyCleanup
from sagas.trip import BookTrip, Trip

DEMO: list[type[Saga[Any]]] = [ExpenseClaim, BookTrip, FulfilOrder]
"""The sagas ``saga demo`` runs."""
CATALOGUE: list[type[Saga[Any]]] = [*DEMO, Onboarding, ExpenseReport, NightlyCleanup]
"""Every saga of the catalogue."""


def customers_url(database: str | None = None) -> str | None:
    """Where the ``Customers`` application keeps its events beside the catalogue's database: the same
    PostgreSQL database, a file of its own next to an SQLite one (``x.db`` -> ``x.customers.db``);
    ``None`` in memory (the application is then an instance in this process)."""
    url = database or Settings.from_env().database_url
    db = parse_database_url(url)
    if db.kind == "sqlite":
        path = db.env["SQLITE_DBNAME"]
        stem = path[: -len(".db")] if path.endswith(".db") else path
        return f"sqlite:///{stem}.customers.db"
    return None if db.kind == "memory" else url


def customers_app(database: str | None = None) -> Customers:
    """The ``Customers`` application beside the catalogue's database (see ``customers_url``), opened."""
    url = customers_url(database)
    return Customers() if url is None else open_upstream(Customers, url)


def build_orchestrator(database: str | None = None, customers: Customers | None = None) -> Orchestrator:
    """An orchestrator for the catalogue and its read models; ``database`` defaults to ``SAGA_DATABASE_URL``.
    ``customers`` is the upstream application; by default workers open it where ``customers_url`` says
    (nothing is opened or written before a worker follows it)."""
    upstream: str | Customers = customers or customers_url(database) or Customers()
    return Orchestrator(
        sagas=CATALOGUE, database=database, projections=[ApprovedExpenses()], upstreams={Customers: upstream}
    )


def app() -> Orchestrator:
    """The catalogue's orchestrator configured from the environment: ``--app sagas:app``."""
    return build_orchestrator()


__all__ = [
    "CATALOGUE",
    "DEMO",
    "build_orchestrator",
    "customers_app",
    "customers_url",
    "app",
    "ExpenseClaim",
    "Expense",
    "ClaimSubmitted",
    "BookTrip",
    "Trip",
    "FulfilOrder",
    "Order",
    "Item",
    "Onboarding",
    "NewCustomer",
    "Customers",
    "Customer",
    "ExpenseReport",
    "NightlyCleanup",
    "ApprovedExpenses",
]
