"""Data-change triggers: the events of another eventsourcing application (an upstream ``Customers``
app) start sagas exactly once, resuming from the tracked position after a restart or a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar
from uuid import UUID

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from pydantic import BaseModel

from orchestrator import ConfigurationError, DefinitionError, Orchestrator, Saga, SagaState, on_change, step
from orchestrator.changes import eventsourcing_env
from tests.conftest import drain


class Customer(Aggregate):
    @event("Registered")
    def __init__(self, email: str, plan: str) -> None:
        self.email = email
        self.plan = plan

    @event("PlanChanged")
    def change_plan(self, plan: str) -> None:
        self.plan = plan


class Customers(Application[UUID]):
    """The upstream application: it records customers' changes as events, knowing nothing of sagas."""

    def register(self, email: str, plan: str) -> UUID:
        customer = Customer(email=email, plan=plan)
        self.save(customer)
        return customer.id

    def change_plan(self, customer_id: UUID, plan: str) -> None:
        customer: Customer = self.repository.get(customer_id)
        customer.change_plan(plan)
        self.save(customer)


class NewCustomer(BaseModel):
    originator_id: str
    email: str
    plan: str


class Onboarding(Saga[NewCustomer]):
    triggers: ClassVar[list[Any]] = [on_change(Customers, Customer.Registered, when=lambda e: e.plan != "free")]

    @step
    def welcome(self, customer: NewCustomer) -> str:
        return f"welcome {customer.email}"


def upstream_url(durable_url: str, tmp_path: Path) -> str:
    """Where Customers keeps its events: the same PostgreSQL schema (made by opening the orchestrator's
    store first), or an SQLite file of its own."""
    Orchestrator(database=durable_url).open().close()
    return durable_url if durable_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'customers.db'}"


def onboarding(orch: Orchestrator) -> list[str]:
    """The emails of the started onboarding sagas, in order."""
    return sorted(s.saga_id for s in orch.list(saga="Onboarding", limit=1000))


def test_upstream_events_start_one_saga_each_and_a_restart_resumes(durable_url: str, tmp_path: Path) -> None:
    """Registered events start an onboarding (a free plan is skipped visibly, other event types are not
    read); a new orchestrator on the same database resumes after the tracked position and starts
    only the new customers' sagas; processing again starts nothing."""
    url = upstream_url(durable_url, tmp_path)
    customers = Customers(env=eventsourcing_env(url))
    ada = customers.register("ada@example.com", "pro")
    customers.register("bob@example.com", "free")
    customers.change_plan(ada, "team")
    with Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}) as orch:
        processor = orch.changes.processor(Customers)
        assert processor.lag().events == 3
        processor.drain()
        assert processor.lag().events == 0
        started = onboarding(orch)
        assert started == [f"Onboarding.on.Customers.Registered:{ada}:1"]
        assert processor.decisions(2) == [
            {"trigger": "Onboarding.on.Customers.Registered", "skipped": "condition is false"}
        ]
        assert processor.decisions(3) is None  # PlanChanged: filtered out in the database
        [status] = drain(orch, *started)
        assert status.state is SagaState.COMPLETED
        assert status.result == {"welcome": "welcome ada@example.com"}
    cyd = customers.register("cyd@example.com", "pro")
    with Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}) as orch:
        orch.changes.processor(Customers).drain()
        orch.changes.processor(Customers).drain()
        assert onboarding(orch) == sorted(
            [f"Onboarding.on.Customers.Registered:{ada}:1", f"Onboarding.on.Customers.Registered:{cyd}:1"]
        )


def test_a_crash_mid_batch_starts_nothing_and_the_retry_starts_each_once(
    durable_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If recording a batch fails, none of its sagas was started and the position did not move; the
    next run starts each one once."""
    url = upstream_url(durable_url, tmp_path)
    customers = Customers(env=eventsourcing_env(url))
    for i in range(5):
        customers.register(f"c{i}@example.com", "pro")
    with Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}) as orch:
        processor = orch.changes.processor(Customers)
        import orchestrator.changes as changes

        real = changes.record_starts

        def crash(*args: Any) -> None:
            raise ConnectionError("the database went away mid-commit")

        monkeypatch.setattr(changes, "record_starts", crash)
        with pytest.raises(ConnectionError):
            processor.catch_up()
        assert onboarding(orch) == []
        assert processor.lag().events == 5
        monkeypatch.setattr(changes, "record_starts", real)
        processor.drain()
        assert len(onboarding(orch)) == 5


def test_two_processors_racing_start_each_saga_once(durable_url: str, tmp_path: Path) -> None:
    """Two orchestrators (two workers) processing the same upstream batch: one records it, the other's
    write is refused; every customer gets one onboarding."""
    url = upstream_url(durable_url, tmp_path)
    customers = Customers(env=eventsourcing_env(url))
    for i in range(20):
        customers.register(f"c{i}@example.com", "pro")
    a = Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}).open()
    b = Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}).open()
    try:
        first, second = a.changes.processor(Customers), b.changes.processor(Customers)
        assert first.catch_up(limit=10) == 10
        position = a.repository.index.tracked(first.tracking_name)
        assert b.repository.index.tracked(second.tracking_name) == position
        second.drain()
        first.drain()
        assert len(onboarding(a)) == 20
    finally:
        a.close()
        b.close()


def test_a_worker_runs_the_change_triggers(durable_url: str, tmp_path: Path) -> None:
    """The worker's side task follows the upstream: a registered customer's saga starts and completes
    without anyone calling the processor."""
    url = upstream_url(durable_url, tmp_path)
    customer = Customers(env=eventsourcing_env(url)).register("dee@example.com", "pro")
    with Orchestrator(sagas=[Onboarding], database=durable_url, upstreams={Customers: url}) as orch:
        orch.run_worker(wait=False, poll_interval=0.01)
        [status] = drain(orch, f"Onboarding.on.Customers.Registered:{customer}:1")
        assert status.state is SagaState.COMPLETED


def test_bad_change_triggers_are_refused() -> None:
    """on_change with something that is not an Application class, or an uncallable condition, is a
    DefinitionError; an SQLite upstream in the orchestrator's own file is a ConfigurationError."""
    with pytest.raises(DefinitionError, match="Application class"):
        on_change(object, Customer.Registered)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="must be callable"):
        on_change(Customers, Customer.Registered, when=True)  # type: ignore[arg-type]


def test_an_sqlite_upstream_needs_a_file_of_its_own(tmp_path: Path) -> None:
    """Following an upstream in the orchestrator's own SQLite file is refused with the fix in the message."""
    orch = Orchestrator(sagas=[Onboarding], database=f"sqlite:///{tmp_path / 'own.db'}")
    with pytest.raises(ConfigurationError, match="file of its own"):
        orch.changes.processors()


def test_an_upstream_that_is_down_delays_nothing_else(tmp_path: Path) -> None:
    """A change trigger whose upstream cannot be read backs off on its own: the worker's other sagas
    run at once, and the side task returns instead of raising."""
    broken = tmp_path / "gone" / "customers.db"
    with Orchestrator(
        sagas=[Onboarding, Plain],
        database=f"sqlite:///{tmp_path / 'own.db'}",
        upstreams={Customers: f"sqlite:///{broken}"},
    ) as orch:
        assert orch.changes.run() == 5.0
        saga_id = orch.start(Plain, {"n": 1})
        [status] = drain(orch, saga_id, timeout=5)
        assert status.state is SagaState.COMPLETED


class Numbered(BaseModel):
    n: int


class Plain(Saga[Numbered]):
    @step
    def one(self, job: Numbered) -> int:
        return job.n
