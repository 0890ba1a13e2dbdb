"""The saga catalogue against its fake services: happy paths, faults, compensation, approval and idempotency."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator import NonRetryable, Orchestrator, Saga, SagaState, SagaStatus, StepState, UnexpectedEvent, wait_for
from sagas import (
    CATALOGUE,
    BookTrip,
    ClaimSubmitted,
    Expense,
    ExpenseClaim,
    FulfilOrder,
    Order,
    Trip,
    app,
    build_orchestrator,
    customers_app,
)
from sagas.services import SERVICES, Faults, HotelService, Reservation, Services, ServiceUnavailable
from tests.conftest import drain

TRIP = Trip(traveller="Ada", hotel="Grand Hotel", nights=2, car="compact", flight="LH 123")
ORDER = Order.model_validate(
    {"order_id": "o-1", "items": [("book", 2), ("lamp", 1)], "amount": "54.90", "address": "1 Main St"}
)
EXPENSE = Expense(employee="ada", amount=Decimal("120.50"), description="train to the conference")


class HastyExpenseClaim(Saga[Expense]):
    """``ExpenseClaim`` with a 0.2 s approval window, so that a timeout can be tested.

    It shares ``ExpenseClaim``'s step objects, compensations included; it must not add compensations
    to them, which would change ``ExpenseClaim`` too.
    """

    submit = ExpenseClaim.submit
    approval = wait_for("approved", timeout=0.2, on_timeout="compensate")
    pay = ExpenseClaim.pay


@pytest.fixture(autouse=True)
def services() -> Iterator[Services]:
    """The service registry, fresh and fault-free before and after each test."""
    SERVICES.reset()
    yield SERVICES
    SERVICES.reset()


@pytest.fixture
def orch() -> Iterator[Orchestrator]:
    """An in-memory orchestrator with the catalogue (and the hasty expense claim) registered."""
    with Orchestrator(sagas=[*CATALOGUE, HastyExpenseClaim], database="memory://") as orchestrator:
        yield orchestrator


def steps(status: SagaStatus) -> dict[str, tuple[StepState, int]]:
    """Each step's state and attempts, by name."""
    return {step.name: (step.state, step.attempts) for step in status.steps}


def park(orch: Orchestrator, saga_id: str) -> SagaStatus:
    """Run the worker until nothing is runnable, and return the saga's status."""
    orch.run_worker(wait=False, poll_interval=0.01)
    return orch.status(saga_id)


# BookTrip


def test_trip_books_hotel_car_and_flight(orch: Orchestrator, services: Services) -> None:
    """On the happy path the trip completes with one reservation at each service, none cancelled."""
    (status,) = drain(orch, orch.start(BookTrip, TRIP))

    assert status.state is SagaState.COMPLETED
    assert [(entry.service, entry.action) for entry in services.journal.entries()] == [
        ("hotel", "reserve"),
        ("car", "reserve"),
        ("flight", "reserve"),
    ]
    flight = Reservation.model_validate(status.result["book_flight"])
    assert flight.item == "LH 123"
    assert status.result["reserve_hotel"]["item"] == "Grand Hotel, 2 night(s)"


def test_sold_out_flight_cancels_car_then_hotel(orch: Orchestrator, services: Services) -> None:
    """A sold-out flight fails at once and the car, then the hotel, are cancelled."""
    services.reset(flight=Faults(permanent=True))

    (status,) = drain(orch, orch.start(BookTrip, TRIP))

    assert status.state is SagaState.COMPENSATED
    assert steps(status) == {
        "reserve_hotel": (StepState.COMPENSATED, 1),
        "rent_car": (StepState.COMPENSATED, 1),
        "book_flight": (StepState.FAILED, 1),
    }
    assert "sold out" in (status.steps[2].last_error or "")
    cancels = services.journal.entries("cancel")
    assert [entry.service for entry in cancels] == ["car", "hotel"]
    assert [entry.ref for entry in cancels] == [status.result["rent_car"]["id"], status.result["reserve_hotel"]["id"]]
    assert services.flight.calls["reserve"] == 1
    assert set(services.hotel.undone) == set(services.hotel.records)
    assert set(services.car.undone) == set(services.car.records)


def test_transient_faults_are_retried(orch: Orchestrator, services: Services) -> None:
    """A hotel that is unavailable twice is asked a third time, and the trip completes with one room."""
    services.reset(hotel=Faults(transient_failures=2), car=Faults(transient_failures=1))

    (status,) = drain(orch, orch.start(BookTrip, TRIP))

    assert status.state is SagaState.COMPLETED
    assert steps(status) == {
        "reserve_hotel": (StepState.SUCCEEDED, 3),
        "rent_car": (StepState.SUCCEEDED, 2),
        "book_flight": (StepState.SUCCEEDED, 1),
    }
    assert services.hotel.calls["reserve"] == 3
    assert len(services.hotel.records) == 1


def test_lost_reply_is_retried_without_double_booking(orch: Orchestrator, services: Services) -> None:
    """When the hotel books but its reply is lost, the retry's idempotency key finds the same room."""
    services.reset(hotel=Faults(lost_replies=1))

    (status,) = drain(orch, orch.start(BookTrip, TRIP))

    assert status.state is SagaState.COMPLETED
    assert steps(status)["reserve_hotel"] == (StepState.SUCCEEDED, 2)
    assert services.hotel.calls["reserve"] == 2
    (room,) = services.hotel.records.values()
    assert status.result["reserve_hotel"]["id"] == room.id


def test_starting_a_trip_twice_books_once(orch: Orchestrator, services: Services) -> None:
    """A repeated start with the same saga id starts nothing, so nothing is booked twice."""
    first = orch.start(BookTrip, TRIP, saga_id="trip-42")
    second = orch.start(BookTrip, TRIP.model_dump(), saga_id="trip-42")

    (status,) = drain(orch, first)

    assert first == second == "trip-42"
    assert status.state is SagaState.COMPLETED
    assert len(services.journal.entries("reserve")) == 3


# ExpenseClaim


def test_approved_expense_is_paid_once(orch: Orchestrator, services: Services) -> None:
    """A claim waits for the manager; once approved it is paid exactly once."""
    saga_id = orch.start(ExpenseClaim, EXPENSE)
    parked = park(orch, saga_id)
    assert parked.state is SagaState.WAITING
    assert parked.waiting_for == "approved"
    assert services.ledger.calls["pay_out"] == 0

    orch.send(saga_id, "approved", {"by": "manager"})
    (status,) = drain(orch, saga_id)

    assert status.state is SagaState.COMPLETED
    assert services.ledger.calls["pay_out"] == 1
    assert status.result["pay"]["amount"] == "120.50"
    assert [entry.action for entry in services.journal.entries()] == ["submit", "pay_out"]


def test_early_approval_is_kept_until_the_claim_gets_there(orch: Orchestrator, services: Services) -> None:
    """An approval sent before the claim is even recorded is consumed when the saga reaches its wait."""
    saga_id = orch.start(ExpenseClaim, EXPENSE)
    orch.send(saga_id, "approved", {"by": "manager"})

    (status,) = drain(orch, saga_id)

    assert status.state is SagaState.COMPLETED
    assert len(services.ledger.records) == 2  # the claim and its payout


def test_unapproved_expense_times_out_and_is_withdrawn(orch: Orchestrator, services: Services) -> None:
    """Without an approval in time the claim is withdrawn and nothing is paid."""
    (status,) = drain(orch, orch.start(HastyExpenseClaim, EXPENSE))

    assert status.state is SagaState.COMPENSATED
    assert steps(status)["submit"] == (StepState.COMPENSATED, 1)
    assert steps(status)["pay"] == (StepState.PENDING, 0)
    assert [entry.action for entry in services.journal.entries()] == ["submit", "withdraw"]
    assert services.ledger.calls["pay_out"] == 0
    assert "WaitTimedOut" in [event.type for event in orch.history(status.saga_id)]
    with pytest.raises(UnexpectedEvent):
        orch.send(status.saga_id, "approved", {"by": "a manager, too late"})


def test_rejected_expense_is_cancelled_and_withdrawn(orch: Orchestrator, services: Services) -> None:
    """A manager who rejects the claim cancels the saga, which withdraws the claim."""
    saga_id = orch.start(ExpenseClaim, EXPENSE)
    assert park(orch, saga_id).state is SagaState.WAITING

    orch.cancel(saga_id, reason="rejected")
    (status,) = drain(orch, saga_id)

    assert status.state is SagaState.CANCELLED
    assert [entry.action for entry in services.journal.entries()] == ["submit", "withdraw"]


# FulfilOrder


def test_order_is_reserved_charged_and_shipped(orch: Orchestrator, services: Services) -> None:
    """The order completes through its async ``ship`` step, which emits ``OrderShipped``."""
    (status,) = drain(orch, orch.start(FulfilOrder, ORDER))

    assert status.state is SagaState.COMPLETED
    assert status.result["reserve_stock"]["items"] == {"book": 2, "lamp": 1}
    assert services.warehouse.stock == {"book": 8, "lamp": 2, "chair": 4}
    assert services.payment.calls["charge"] == 1
    assert status.result["ship"]["order_id"] == "o-1"
    emitted = [event.data for event in orch.history(status.saga_id) if event.type == "DomainEventEmitted"]
    assert [(event["event"], event["data"]["order_id"]) for event in emitted] == [("OrderShipped", "o-1")]


def test_declined_card_releases_the_stock(orch: Orchestrator, services: Services) -> None:
    """A declined card fails the order at once and the held stock goes back on the shelves."""
    services.reset(payment=Faults(permanent=True))

    (status,) = drain(orch, orch.start(FulfilOrder, ORDER))

    assert status.state is SagaState.COMPENSATED
    assert steps(status)["charge_payment"] == (StepState.FAILED, 1)
    assert steps(status)["ship"] == (StepState.PENDING, 0)
    assert services.warehouse.stock == {"book": 10, "lamp": 3, "chair": 4}
    assert [entry.action for entry in services.journal.entries()] == ["hold", "release"]


def test_out_of_stock_order_leaves_nothing_to_undo(orch: Orchestrator, services: Services) -> None:
    """An order for more lamps than there are fails at its first step; the card is never charged."""
    order = {**ORDER.model_dump(), "items": [("lamp", 4)]}

    (status,) = drain(orch, orch.start(FulfilOrder, order))

    assert status.state is SagaState.COMPENSATED
    assert steps(status)["reserve_stock"] == (StepState.FAILED, 1)
    assert "out of stock: lamp" in (status.steps[0].last_error or "")
    assert services.payment.calls["charge"] == 0
    assert services.journal.entries() == []


def test_refund_follows_a_failed_shipment(orch: Orchestrator, services: Services) -> None:
    """When shipping fails for good, the payment is refunded before the stock is released."""
    services.reset(warehouse=Faults(transient_failures=1), shipping=Faults(permanent=True))

    (status,) = drain(orch, orch.start(FulfilOrder, ORDER))

    assert status.state is SagaState.COMPENSATED
    assert steps(status)["reserve_stock"] == (StepState.COMPENSATED, 2)
    assert [(entry.service, entry.action) for entry in services.journal.entries()] == [
        ("warehouse", "hold"),
        ("payment", "charge"),
        ("payment", "refund"),
        ("warehouse", "release"),
    ]


# Every backend, and the package's entry points


def test_catalogue_completes_on_sqlite(tmp_path: Path, services: Services) -> None:
    """All three sagas, with transient faults, complete side by side on a SQLite file."""
    services.reset(hotel=Faults(transient_rate=0.5, seed=7), payment=Faults(transient_failures=1))
    with build_orchestrator(f"sqlite:///{tmp_path / 'catalogue.db'}") as orch:
        trip = orch.start(BookTrip, TRIP)
        order = orch.start(FulfilOrder, ORDER)
        claim = orch.start(ExpenseClaim, EXPENSE)
        orch.send(claim, "approved", {"by": "manager"})
        statuses = drain(orch, trip, order, claim)

    assert [status.state for status in statuses] == [SagaState.COMPLETED] * 3
    booked = [services.hotel, services.car, services.flight, services.warehouse, services.payment, services.shipping]
    assert [len(service.records) for service in booked] == [1] * 6
    assert len(services.ledger.records) == 2  # the claim and its payout


def test_app_factory_registers_the_catalogue() -> None:
    """``sagas:app`` and ``build_orchestrator`` register the six sagas, and build without opening storage."""
    assert sorted(build_orchestrator("memory://").sagas) == [
        "BookTrip",
        "ExpenseClaim",
        "ExpenseReport",
        "FulfilOrder",
        "NightlyCleanup",
        "Onboarding",
    ]
    assert set(app().sagas) == {saga.name for saga in CATALOGUE}


# Triggers, a data-change trigger, schedules and limits in the catalogue


def test_a_submitted_claim_starts_an_expense_claim_and_a_draft_does_not(durable_url: str, tmp_path: Path) -> None:
    """ClaimSubmitted starts one ExpenseClaim (a draft is skipped visibly); the claim runs up to the
    approval and is paid once approved."""
    with build_orchestrator(durable_url) as orch:
        orch.emit(ClaimSubmitted(employee="ada", amount=Decimal("80"), description="taxi"), event_id="form-1")
        orch.emit(ClaimSubmitted(employee="ada", amount=Decimal("9"), description="pen", draft=True), event_id="form-2")
        orch.run_worker(wait=False, poll_interval=0.01)
        [claim] = orch.list(saga="ExpenseClaim")
        assert claim.saga_id == "ExpenseClaim.on.ClaimSubmitted:form-1"
        assert claim.waiting_for == "approved"
        skipped = {e.event_id: e.triggers for e in orch.events()}["form-2"]
        assert skipped == [{"trigger": "ExpenseClaim.on.ClaimSubmitted", "skipped": "condition is false"}]
        orch.send(claim.saga_id, "approved", {"by": "manager"})
        [paid] = drain(orch, claim.saga_id)
        assert paid.state is SagaState.COMPLETED


def test_an_employee_has_at_most_ten_claims_in_flight(services: Services) -> None:
    """The eleventh claim of one employee waits, queued with the reason, while another employee's runs."""
    with build_orchestrator("memory://") as orch:
        ids = [orch.start(ExpenseClaim, EXPENSE) for _ in range(11)]
        other = orch.start(ExpenseClaim, EXPENSE.model_copy(update={"employee": "bob"}))
        orch.run_worker(wait=False, poll_interval=0.01)
        waiting = [orch.status(i).waiting_for for i in ids]
        assert waiting.count("approved") == 10
        assert orch.status(ids[-1]).queued == "waiting for a slot: at most 10 running for 'ada'"
        assert orch.status(other).waiting_for == "approved"
        orch.cancel(ids[0], "rejected")
        orch.run_worker(wait=False, poll_interval=0.01)
        assert orch.status(ids[-1]).waiting_for == "approved"


def test_a_registered_customer_is_onboarded_once(durable_url: str, services: Services) -> None:
    """A paying customer registered in the Customers application gets one welcome and one guide; a free
    one gets nothing; a second worker run sends nothing twice."""
    customers = customers_app(durable_url)
    with build_orchestrator(durable_url, customers) as orch:
        ada = customers.register("Ada", "ada@example.com", "pro")
        customers.register("Bob", "bob@example.com", "free")
        orch.run_worker(wait=False, poll_interval=0.01)
        [status] = drain(orch, f"Onboarding.on.Customers.Registered:{ada}:1")
        assert status.state is SagaState.COMPLETED
        orch.run_worker(wait=False, poll_interval=0.01)
    assert sorted(m.subject for m in services.mail.records.values()) == ["Getting started with pro", "Welcome, Ada"]


def test_the_catalogue_declares_its_schedules(services: Services) -> None:
    """The weekday report and the nightly clean-up are declared; firing them by hand runs them."""
    with build_orchestrator("memory://") as orch:
        orch.scheduler.run()
        rows = {row["schedule_id"]: row for row in orch.scheduler.rows()}
        assert rows["expense-report"]["spec"]["tz"] == "Europe/Berlin"
        assert rows["nightly-cleanup"]["spec"]["cron"] == "30 3 * * *"
        report = orch.scheduler.trigger("expense-report")
        cleanup = orch.scheduler.trigger("nightly-cleanup")
        statuses = drain(orch, report, cleanup)
        assert [s.state for s in statuses] == [SagaState.COMPLETED, SagaState.COMPLETED]
        assert statuses[0].result["summarise"] == {"period": "daily", "open_claims": 0, "paid": "0"}
        assert statuses[1].result["purge"]["sagas"] == 0


# The fake services themselves


def test_service_books_once_per_idempotency_key() -> None:
    """Two reservations under one key are one booking; another key is another booking."""
    hotel = HotelService()

    first = hotel.reserve("room", key="k1")
    again = hotel.reserve("room", key="k1")
    other = hotel.reserve("room", key="k2")

    assert first == again != other
    assert hotel.calls["reserve"] == 3
    assert len(hotel.records) == 2


def test_service_faults_are_configurable_and_repeatable() -> None:
    """Transient faults come first, seeded random faults repeat with the seed, and refusals are permanent."""
    hotel = HotelService(Faults(transient_failures=2))
    for _ in range(2):
        with pytest.raises(ServiceUnavailable):
            hotel.reserve("room", key="k")
    assert hotel.reserve("room", key="k").item == "room"

    def pattern() -> list[bool]:
        flaky = HotelService(Faults(transient_rate=0.5, seed=3))
        outcomes = []
        for n in range(20):
            try:
                flaky.reserve("room", key=f"k{n}")
                outcomes.append(True)
            except ServiceUnavailable:
                outcomes.append(False)
        return outcomes

    assert pattern() == pattern()
    assert 0 < sum(pattern()) < 20
    with pytest.raises(NonRetryable, match="no rooms"):
        HotelService(Faults(permanent=True)).reserve("room", key="k")


def test_building_the_catalogue_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sagas:app and build_orchestrator open no database and create no file until a worker runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAGA_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    app()
    build_orchestrator(f"sqlite:///{tmp_path / 'y.db'}")
    assert list(tmp_path.iterdir()) == []
