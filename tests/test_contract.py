"""The Orchestrator's contract (DESIGN.md), run on every backend: memory, SQLite and PostgreSQL.

Each test builds its saga classes inside its own body, so their side effects land in that
test's own recorder (``rec``) and nothing leaks from one test to the next. Models named in
return annotations live at module level, where ``get_type_hints`` can resolve them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import (
    InvalidInput,
    InvalidTransition,
    NonRetryable,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaAlreadyStarted,
    SagaNotFound,
    SagaState,
    SagaStatus,
    StepState,
    UnexpectedEvent,
    UnknownSaga,
    step,
    wait_for,
)
from tests.conftest import drain

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.05)
ONCE = RetryPolicy(max_attempts=1)


# Models (module level: return annotations are resolved against the module's globals).


class Trip(BaseModel):
    hotel: str
    flight: str


class Reservation(BaseModel):
    id: str
    nights: int


class Approval(BaseModel):
    by: str


class Shipped(BaseModel):
    parcel: str


class Attempted(BaseModel):
    attempt: int


class Recorder:
    """What a test's sagas did: calls in order, and anything else they saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seen: dict[str, Any] = {}
        self.keys: list[tuple[str, str, int, str]] = []  # (saga_id, step, attempt, idempotency_key)
        self.lock = threading.Lock()

    def call(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.calls)


@pytest.fixture
def rec() -> Recorder:
    """A fresh recorder per test."""
    return Recorder()


@pytest.fixture
def trip() -> Trip:
    return Trip(hotel="H1", flight="F1")


# Helpers


def types(orch: Orchestrator, saga_id: str) -> list[str]:
    """The event type names of a saga's history, in order."""
    return [event.type for event in orch.history(saga_id)]


def typed_steps(orch: Orchestrator, saga_id: str, *kinds: str) -> list[tuple[str, str | None]]:
    """(type, step) of the history events of the given types, in order."""
    return [(e.type, e.step) for e in orch.history(saga_id) if e.type in kinds]


def step_states(status: SagaStatus) -> dict[str, str]:
    return {s.name: s.state.value for s in status.steps}


def settle(orch: Orchestrator, saga_id: str, state: SagaState, timeout: float = 10.0) -> SagaStatus:
    """Run the worker in this process until the saga reaches ``state`` (which need not be terminal)."""
    deadline = time.monotonic() + timeout
    while True:
        orch.run_worker(wait=False, poll_interval=0.01)
        status = orch.status(saga_id)
        if status.state is state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"saga {saga_id} is {status.state}, not {state}, after {timeout} s")
        time.sleep(0.01)


def undo_saga(rec: Recorder, fail_at: str = "charge", error: type[BaseException] | None = None, **policies: Any) -> Any:
    """A five-step saga: reserve (undo) / notify (no undo) / hold (undo) / charge / ship.

    ``charge`` raises ``error`` on every attempt (``NonRetryable`` by default).
    """
    policy = policies.get("policy", FAST)
    exc = error or NonRetryable

    class Undo(Saga[Trip]):
        @step(retry=policy)
        def reserve(self, trip: Trip) -> Reservation:
            rec.call("reserve")
            rec.seen.setdefault("reserve_at", datetime.now(UTC))
            if fail_at == "reserve":
                raise exc("no rooms")
            return Reservation(id=f"R-{trip.hotel}", nights=2)

        @reserve.compensate
        def cancel_reserve(self, trip: Trip, reservation: Reservation) -> None:
            rec.seen["undo_reserve_arg"] = reservation
            rec.call("undo_reserve")

        @step(retry=policy)
        def notify(self, trip: Trip) -> None:
            rec.call("notify")

        @step(retry=policy)
        def hold(self, trip: Trip) -> str:
            rec.call("hold")
            return "hold-1"

        @hold.compensate
        def release_hold(self, trip: Trip, hold: str) -> None:
            rec.seen["undo_hold_arg"] = hold
            rec.call("undo_hold")

        @step(retry=policy)
        def charge(self, trip: Trip) -> None:
            rec.call("charge")
            if fail_at == "charge":
                raise exc("card declined")

        @step(retry=policy)
        def ship(self, trip: Trip) -> None:
            rec.call("ship")

    return Undo


def approval_saga(rec: Recorder, **wait: Any) -> Any:
    """prepare (undo) / wait_for("approved", **wait) / finish (reads ``self.received``)."""

    class Approve(Saga[Trip]):
        @step(retry=FAST)
        def prepare(self, trip: Trip) -> str:
            rec.call("prepare")
            return "prepared"

        @prepare.compensate
        def unprepare(self, trip: Trip, prepared: str) -> None:
            rec.call("undo_prepare")

        approval = wait_for("approved", **wait)

        @step(retry=FAST)
        def finish(self, trip: Trip) -> str:
            rec.call("finish")
            rec.seen["received"] = dict(self.received)
            return "done"

    return Approve


# Completion


def test_completion_runs_each_step_once_in_order(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A saga whose steps succeed runs each once, in order, and ends completed with its outputs by step name."""

    class BookTrip(Saga[Trip]):
        @step(retry=FAST)
        def reserve_hotel(self, trip: Trip) -> Reservation:
            rec.call("reserve_hotel")
            rec.seen["self"] = (self.saga_id, self.input, trip, self.attempt, dict(self.results), dict(self.received))
            self.log.info("reserving", hotel=trip.hotel)
            return Reservation(id=f"R-{trip.hotel}", nights=3)

        @step
        def book_flight(self, trip: Trip) -> str:
            rec.call("book_flight")
            reservation = self.results["reserve_hotel"]
            rec.seen["reservation"] = reservation
            return f"{trip.flight}+{reservation.id}"

        @step()
        async def confirm(self, trip: Trip) -> None:
            rec.call("confirm")
            rec.seen["results"] = dict(self.results)

    with Orchestrator(sagas=[BookTrip], database=database_url) as orch:
        saga_id = orch.start(BookTrip, trip)
        (status,) = drain(orch, saga_id)
        history = orch.history(saga_id)

    assert rec.calls == ["reserve_hotel", "book_flight", "confirm"]
    assert status.state is SagaState.COMPLETED
    assert status.saga == "BookTrip"
    assert status.saga_id == saga_id
    assert status.result == {
        "reserve_hotel": {"id": "R-H1", "nights": 3},
        "book_flight": "F1+R-H1",
        "confirm": None,
    }
    assert [(s.name, s.state, s.attempts) for s in status.steps] == [
        ("reserve_hotel", StepState.SUCCEEDED, 1),
        ("book_flight", StepState.SUCCEEDED, 1),
        ("confirm", StepState.SUCCEEDED, 1),
    ]
    # Later steps see earlier outputs validated through the return annotation (a model, not a dict).
    assert rec.seen["reservation"] == Reservation(id="R-H1", nights=3)
    assert rec.seen["results"] == {"reserve_hotel": Reservation(id="R-H1", nights=3), "book_flight": "F1+R-H1"}
    kinds = [e.type for e in history]
    assert kinds[0] == "SagaStarted"
    assert kinds[-1] == "SagaCompleted"
    assert [(e.type, e.step) for e in history if e.type == "StepSucceeded"] == [
        ("StepSucceeded", "reserve_hotel"),
        ("StepSucceeded", "book_flight"),
        ("StepSucceeded", "confirm"),
    ]
    assert rec.seen["self"] == (saga_id, trip, trip, 1, {}, {})
    assert isinstance(rec.seen["self"][1], Trip)
    assert [e.version for e in history] == sorted(e.version for e in history)
    assert all(e.timestamp.tzinfo is not None for e in history)
    assert [e.timestamp for e in history] == sorted(e.timestamp for e in history)
    assert status.version == history[-1].version


def test_idempotency_key_is_stable_per_step_and_distinct_across_steps_and_sagas(
    database_url: str, rec: Recorder, trip: Trip
) -> None:
    """`idempotency_key` is the same on every retry of a step and differs between steps and between sagas."""

    class Keys(Saga[Trip]):
        @step(retry=FAST)
        def first(self, trip: Trip) -> None:
            with rec.lock:
                rec.keys.append((self.saga_id, "first", self.attempt, self.idempotency_key))
            if self.attempt < 3:
                raise RuntimeError("flaky")

        @step(retry=FAST)
        def second(self, trip: Trip) -> None:
            with rec.lock:
                rec.keys.append((self.saga_id, "second", self.attempt, self.idempotency_key))

    with Orchestrator(sagas=[Keys], database=database_url) as orch:
        a = orch.start(Keys, trip, saga_id="keys-a")
        b = orch.start(Keys, trip, saga_id="keys-b")
        drain(orch, a, b)

    by = {(s, name, attempt): key for s, name, attempt, key in rec.keys}
    assert sorted(attempt for s, name, attempt, _ in rec.keys if (s, name) == (a, "first")) == [1, 2, 3]
    assert by[(a, "first", 1)] == by[(a, "first", 2)] == by[(a, "first", 3)]
    assert by[(b, "first", 1)] == by[(b, "first", 3)]
    keys = {by[(a, "first", 1)], by[(a, "second", 1)], by[(b, "first", 1)], by[(b, "second", 1)]}
    assert len(keys) == 4


# Retries


def test_transient_faults_are_retried_until_success(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A step that fails twice then succeeds completes the saga after 3 attempts, with 2 StepAttemptFailed."""

    class Flaky(Saga[Trip]):
        @step(retry=FAST)
        def before(self, trip: Trip) -> None:
            rec.call("before")

        @step(retry=FAST)
        def flaky(self, trip: Trip) -> int:
            rec.call("flaky")
            if self.attempt <= 2:
                raise ConnectionError(f"blip {self.attempt}")
            return self.attempt

    with Orchestrator(sagas=[Flaky], database=database_url) as orch:
        saga_id = orch.start(Flaky, trip)
        (status,) = drain(orch, saga_id)
        events = typed_steps(orch, saga_id, "StepAttemptFailed", "StepSucceeded", "StepFailed")
        failures = [e.data for e in orch.history(saga_id) if e.type == "StepAttemptFailed"]

    assert status.state is SagaState.COMPLETED
    assert rec.counts == Counter(before=1, flaky=3)
    assert status.steps[1].name == "flaky"
    assert status.steps[1].attempts == 3
    assert status.result["flaky"] == 3
    assert events == [
        ("StepSucceeded", "before"),
        ("StepAttemptFailed", "flaky"),
        ("StepAttemptFailed", "flaky"),
        ("StepSucceeded", "flaky"),
    ]
    assert len(failures) == 2
    assert "ConnectionError: blip 1" in failures[0]["error"]
    assert "ConnectionError: blip 2" in failures[1]["error"]


def test_a_retry_waits_for_its_backoff(database_url: str, rec: Recorder, trip: Trip) -> None:
    """After a failed attempt the next one is not run before the policy's interval has passed."""
    policy = RetryPolicy(max_attempts=2, initial_interval=timedelta(seconds=0.3), max_interval=1, jitter=0)
    ran: list[float] = []

    class Backoff(Saga[Trip]):
        @step(retry=policy)
        def flaky(self, trip: Trip) -> None:
            ran.append(time.monotonic())
            if self.attempt == 1:
                raise ConnectionError("blip")

    with Orchestrator(sagas=[Backoff], database=database_url) as orch:
        saga_id = orch.start(Backoff, trip)
        orch.run_worker(wait=False, poll_interval=0.01)
        orch.run_worker(wait=False, poll_interval=0.01)  # the retry is not due yet: runs nothing
        between = orch.status(saga_id)
        (status,) = drain(orch, saga_id)
        failed = next(e for e in orch.history(saga_id) if e.type == "StepAttemptFailed")

    assert len(ran) == 2
    assert between.state is SagaState.RUNNING
    assert between.steps[0].attempts == 1
    assert between.due_at is not None
    assert status.state is SagaState.COMPLETED
    assert ran[1] - ran[0] >= 0.3
    delay = (datetime.fromisoformat(failed.data["retry_at"]) - failed.timestamp).total_seconds()
    assert delay == pytest.approx(0.3, abs=0.01)


# Permanent failure and compensation


@pytest.mark.parametrize(
    ("error", "policy", "attempts"),
    [
        pytest.param(NonRetryable, FAST, 1, id="non_retryable"),
        pytest.param(RuntimeError, FAST, 3, id="exhausted"),
        pytest.param(
            ValueError,
            RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.05, non_retryable=(ValueError,)),
            1,
            id="policy_non_retryable",
        ),
    ],
)
def test_permanent_failure_compensates_completed_steps_in_reverse(
    database_url: str, rec: Recorder, trip: Trip, error: type[Exception], policy: RetryPolicy, attempts: int
) -> None:
    """A step that fails for good undoes the completed steps in reverse order (skipping those without an undo)."""
    undo = undo_saga(rec, error=error, policy=policy)
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        saga_id = orch.start(undo, trip)
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
        comp = typed_steps(orch, saga_id, "CompensationStarted", "CompensationSucceeded", "StepFailed")

    assert rec.calls == ["reserve", "notify", "hold", *["charge"] * attempts, "undo_hold", "undo_reserve"]
    assert status.state is SagaState.COMPENSATED
    assert step_states(status) == {
        "reserve": "compensated",
        "notify": "succeeded",  # no compensation: skipped, not undone
        "hold": "compensated",
        "charge": "failed",
        "ship": "pending",
    }
    assert status.steps[3].attempts == attempts
    assert error.__name__ in (status.steps[3].last_error or "")
    assert "card declined" in (status.error or "")
    assert kinds.count("StepAttemptFailed") == attempts - 1
    assert comp == [
        ("StepFailed", "charge"),
        ("CompensationStarted", "hold"),
        ("CompensationSucceeded", "hold"),
        ("CompensationStarted", "reserve"),
        ("CompensationSucceeded", "reserve"),
    ]
    assert kinds[-1] == "SagaCompensated"
    # A compensation gets its step's output, validated through the step's return annotation.
    assert rec.seen["undo_reserve_arg"] == Reservation(id="R-H1", nights=2)
    assert rec.seen["undo_hold_arg"] == "hold-1"


def test_failure_at_first_step_compensates_nothing(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A saga whose first step fails for good ends compensated with nothing undone and the rest pending."""
    undo = undo_saga(rec, fail_at="reserve")
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        saga_id = orch.start(undo, trip)
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)

    assert rec.calls == ["reserve"]
    assert status.state is SagaState.COMPENSATED
    assert step_states(status) == {
        "reserve": "failed",
        "notify": "pending",
        "hold": "pending",
        "charge": "pending",
        "ship": "pending",
    }
    assert not [k for k in kinds if k.startswith("Compensation")]
    assert kinds[-1] == "SagaCompensated"


@pytest.mark.parametrize(
    ("mode", "undo_attempts"),
    [
        pytest.param("own_policy", 2, id="own_policy"),
        pytest.param("step_policy", 4, id="step_policy"),
        pytest.param("non_retryable", 1, id="non_retryable"),
    ],
)
def test_failing_compensation_fails_the_saga_and_retry_resumes_the_undo(
    database_url: str, rec: Recorder, trip: Trip, mode: str, undo_attempts: int
) -> None:
    """A compensation that fails for good leaves the saga failed with the earlier undos not run; retry resumes."""
    broken = {"flag": True}
    b_policy = RetryPolicy(max_attempts=4, initial_interval=0.01, max_interval=0.05)
    own = RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.05)
    undo_b_policy = own if mode == "own_policy" else None

    class Stuck(Saga[Trip]):
        @step(retry=FAST)
        def a(self, trip: Trip) -> str:
            rec.call("a")
            return "a"

        @a.compensate
        def undo_a(self, trip: Trip, out: str) -> None:
            rec.call("undo_a")

        @step(retry=b_policy)
        def b(self, trip: Trip) -> str:
            rec.call("b")
            return "b"

        @b.compensate(retry=undo_b_policy)  # None: the step's own policy
        def undo_b(self, trip: Trip, out: str) -> None:
            rec.call("undo_b")
            if broken["flag"]:
                raise (NonRetryable if mode == "non_retryable" else RuntimeError)("refund service down")

        @step(retry=FAST)
        def c(self, trip: Trip) -> str:
            rec.call("c")
            return "c"

        @c.compensate
        def undo_c(self, trip: Trip, out: str) -> None:
            rec.call("undo_c")

        @step(retry=FAST)
        def d(self, trip: Trip) -> None:
            rec.call("d")
            raise NonRetryable("nope")

    with Orchestrator(sagas=[Stuck], database=database_url) as orch:
        saga_id = orch.start(Stuck, trip)
        (failed,) = drain(orch, saga_id)
        failed_history = typed_steps(
            orch,
            saga_id,
            "CompensationStarted",
            "CompensationSucceeded",
            "CompensationAttemptFailed",
            "CompensationFailed",
            "SagaFailed",
        )
        calls_when_failed = list(rec.calls)
        with pytest.raises(InvalidTransition):
            orch.cancel(saga_id)

        broken["flag"] = False
        orch.retry(saga_id)
        (resumed,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
        with pytest.raises(InvalidTransition):
            orch.retry(saga_id)  # only a failed saga can be retried

    assert failed.state is SagaState.FAILED
    assert calls_when_failed == ["a", "b", "c", "d", "undo_c", *["undo_b"] * undo_attempts]
    b_attempts = [("CompensationStarted", "b"), ("CompensationAttemptFailed", "b")] * (undo_attempts - 1)
    assert failed_history == [
        ("CompensationStarted", "c"),
        ("CompensationSucceeded", "c"),
        *b_attempts,
        ("CompensationStarted", "b"),
        ("CompensationFailed", "b"),
        ("SagaFailed", None),
    ]
    states = step_states(failed)
    assert states["c"] == "compensated"
    assert states["d"] == "failed"
    assert states["b"] != "compensated"
    assert states["a"] == "succeeded"  # not undone: its compensation has not run
    assert failed.steps[1].compensation_attempts == undo_attempts
    assert "refund service down" in (failed.error or "")

    assert resumed.state is SagaState.COMPENSATED
    assert rec.calls == [*calls_when_failed, "undo_b", "undo_a"]
    assert step_states(resumed) == {"a": "compensated", "b": "compensated", "c": "compensated", "d": "failed"}
    assert kinds[-1] == "SagaCompensated"
    assert kinds.count("SagaFailed") == 1
    assert kinds.count("SagaRetried") == 1


def test_cancel_during_compensation_after_a_failure_is_refused(database_url: str, rec: Recorder, trip: Trip) -> None:
    """cancel() while a saga compensates after a failure raises InvalidTransition and the saga ends compensated."""
    holder: dict[str, Orchestrator] = {}

    class Turning(Saga[Trip]):
        @step(retry=FAST)
        def a(self, trip: Trip) -> None:
            rec.call("a")

        @a.compensate
        def undo_a(self, trip: Trip, out: None) -> None:
            rec.call("undo_a")
            try:
                holder["orch"].cancel(self.saga_id)
            except InvalidTransition as error:
                rec.seen["cancel"] = error

        @step(retry=FAST)
        def b(self, trip: Trip) -> None:
            raise NonRetryable("no")

    with Orchestrator(sagas=[Turning], database=database_url) as orch:
        holder["orch"] = orch
        saga_id = orch.start(Turning, trip)
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)

    assert isinstance(rec.seen.get("cancel"), InvalidTransition)
    assert status.state is SagaState.COMPENSATED
    assert "CancelRequested" not in kinds


# Starting


def test_start_is_idempotent_by_saga_id(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A repeated start with the same saga_id and input returns that id and writes nothing; other input raises."""
    undo = undo_saga(rec, fail_at="nowhere")
    approve = approval_saga(rec)
    with Orchestrator(sagas=[undo, approve], database=database_url) as orch:
        saga_id = orch.start(undo, trip, saga_id="order-42")
        before = orch.history(saga_id)
        status_before = orch.status(saga_id)

        assert orch.start(undo, trip, saga_id="order-42") == "order-42"
        assert orch.start("Undo", {"hotel": "H1", "flight": "F1"}, saga_id="order-42") == "order-42"
        assert orch.history(saga_id) == before
        assert orch.status(saga_id) == status_before
        with pytest.raises(SagaAlreadyStarted):
            orch.start(undo, Trip(hotel="H2", flight="F1"), saga_id="order-42")
        with pytest.raises(SagaAlreadyStarted):
            orch.start(approve, trip, saga_id="order-42")  # same id, another saga
        assert orch.history(saga_id) == before

        (done,) = drain(orch, saga_id)
        length = len(orch.history(saga_id))
        assert orch.start(undo, trip, saga_id="order-42") == "order-42"
        drain(orch, saga_id)
        assert len(orch.history(saga_id)) == length
        assert [s.saga_id for s in orch.list()] == ["order-42"]

    assert saga_id == "order-42"
    assert done.state is SagaState.COMPLETED
    assert rec.counts == Counter(reserve=1, notify=1, hold=1, charge=1, ship=1)


def test_bad_requests_raise_and_write_nothing(database_url: str, rec: Recorder, trip: Trip) -> None:
    """Invalid input, an unknown saga or an unknown saga id raise their errors and write nothing."""
    undo = undo_saga(rec)

    class Other(Saga[Trip]):
        @step
        def only(self, trip: Trip) -> None:
            rec.call("only")

    with Orchestrator(sagas=[undo], database=database_url) as orch:
        with pytest.raises(InvalidInput):
            orch.start(undo, {"hotel": "H1"})  # flight missing
        with pytest.raises(InvalidInput):
            orch.start("Undo", {"hotel": 1, "flight": "F1"}, saga_id="bad-1")
        with pytest.raises(InvalidInput):
            orch.start(undo, trip, saga_id="")
        with pytest.raises(InvalidInput):
            orch.start(undo, trip, saga_id="x" * 201)
        with pytest.raises(UnknownSaga):
            orch.start("NoSuchSaga", trip)
        with pytest.raises(UnknownSaga):
            orch.start(Other, trip)  # a class that is not registered
        assert orch.list() == []
        with pytest.raises(SagaNotFound):
            orch.status("bad-1")

        with pytest.raises(SagaNotFound):
            orch.status("ghost")
        with pytest.raises(SagaNotFound):
            orch.history("ghost")
        with pytest.raises(SagaNotFound):
            orch.send("ghost", "approved", {"by": "me"})
        with pytest.raises(SagaNotFound):
            orch.cancel("ghost")
        with pytest.raises(SagaNotFound):
            orch.retry("ghost")
        orch.run_worker(wait=False, poll_interval=0.01)
        assert orch.list() == []

    assert rec.calls == []


# Waiting for events


def test_wait_for_parks_then_send_resumes(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A saga parks on wait_for with no worker busy; send() resumes it and the next step sees the payload."""
    approve = approval_saga(rec)
    with Orchestrator(sagas=[approve], database=database_url) as orch:
        saga_id = orch.start(approve, trip)
        parked = settle(orch, saga_id, SagaState.WAITING)
        began = time.monotonic()
        orch.run_worker(wait=False, poll_interval=0.01)  # nothing is runnable: returns at once
        idle_drain = time.monotonic() - began
        assert orch.status(saga_id) == parked

        orch.send(saga_id, "approved", Approval(by="manager"))
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)

    assert parked.waiting_for == "approved"
    assert parked.current_step == "approval"
    assert step_states(parked) == {"prepare": "succeeded", "approval": "running", "finish": "pending"}
    assert idle_drain < 2.0
    assert status.state is SagaState.COMPLETED
    assert rec.calls == ["prepare", "finish"]
    assert rec.seen["received"] == {"approved": {"by": "manager"}}
    assert kinds.index("EventReceived") < kinds.index("SagaCompleted")
    assert step_states(status)["approval"] == "succeeded"


@pytest.mark.parametrize("when", ["pending", "in_flight"])
def test_early_event_is_consumed_when_the_wait_is_reached(
    database_url: str, rec: Recorder, trip: Trip, when: str
) -> None:
    """An event sent before the saga reaches its wait_for (before it runs, or while a step runs) is consumed there."""
    holder: dict[str, Orchestrator] = {}

    class Early(Saga[Trip]):
        @step(retry=FAST)
        def prepare(self, trip: Trip) -> str:
            rec.call("prepare")
            if when == "in_flight":
                holder["orch"].send(self.saga_id, "approved", {"by": "early bird"})
            return "prepared"

        approval = wait_for("approved", timeout=10)

        @step(retry=FAST)
        def finish(self, trip: Trip) -> None:
            rec.call("finish")
            rec.seen["received"] = dict(self.received)

    with Orchestrator(sagas=[Early], database=database_url) as orch:
        holder["orch"] = orch
        saga_id = orch.start(Early, trip)
        if when == "pending":
            orch.send(saga_id, "approved", {"by": "early bird"})
        (status,) = drain(orch, saga_id, timeout=5)
        kinds = types(orch, saga_id)

    assert status.state is SagaState.COMPLETED
    assert rec.calls == ["prepare", "finish"]
    assert rec.seen["received"] == {"approved": {"by": "early bird"}}
    assert kinds.count("EventReceived") == 1
    assert kinds.index("EventReceived") < kinds.index("StepSucceeded")
    assert "WaitStarted" not in kinds  # it never parked


def test_event_for_a_later_wait_is_kept_while_parked_on_an_earlier_one(
    database_url: str, rec: Recorder, trip: Trip
) -> None:
    """While parked on one wait, an event for a later wait is accepted early and consumed when that wait is reached."""

    class TwoGates(Saga[Trip]):
        @step(retry=FAST)
        def prepare(self, trip: Trip) -> None:
            rec.call("prepare")

        manager = wait_for("manager_ok")
        finance = wait_for("finance_ok")

        @step(retry=FAST)
        def finish(self, trip: Trip) -> None:
            rec.call("finish")
            rec.seen["received"] = dict(self.received)

    with Orchestrator(sagas=[TwoGates], database=database_url) as orch:
        saga_id = orch.start(TwoGates, trip)
        parked = settle(orch, saga_id, SagaState.WAITING)
        orch.send(saga_id, "finance_ok", {"by": "cfo"})
        still = settle(orch, saga_id, SagaState.WAITING)
        orch.send(saga_id, "manager_ok", {"by": "boss"})
        (status,) = drain(orch, saga_id)

    assert parked.waiting_for == "manager_ok"
    assert still.waiting_for == "manager_ok"
    assert rec.calls == ["prepare", "finish"]
    assert status.state is SagaState.COMPLETED
    assert rec.seen["received"] == {"manager_ok": {"by": "boss"}, "finance_ok": {"by": "cfo"}}


def test_early_event_for_a_leading_wait_is_consumed(database_url: str, rec: Recorder, trip: Trip) -> None:
    """An event sent before a saga that begins with wait_for has run at all is consumed when it gets there."""

    class GateFirst(Saga[Trip]):
        approval = wait_for("approved")

        @step(retry=FAST)
        def go(self, trip: Trip) -> None:
            rec.call("go")

    with Orchestrator(sagas=[GateFirst], database=database_url) as orch:
        saga_id = orch.start(GateFirst, trip)
        orch.send(saga_id, "approved", {"by": "early bird"})
        (status,) = drain(orch, saga_id, timeout=1)

    assert status.state is SagaState.COMPLETED
    assert rec.calls == ["go"]


def test_unexpected_events_raise_and_write_nothing(database_url: str, rec: Recorder, trip: Trip) -> None:
    """An event never waited for, a repeated event, or any event to a finished saga raises UnexpectedEvent."""
    approve = approval_saga(rec)
    with Orchestrator(sagas=[approve], database=database_url) as orch:
        saga_id = orch.start(approve, trip)
        settle(orch, saga_id, SagaState.WAITING)
        before = orch.history(saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "rejected", {"by": "manager"})
        assert orch.history(saga_id) == before

        orch.send(saga_id, "approved", {"by": "manager"})
        delivered = orch.history(saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved", {"by": "manager"})
        assert orch.history(saga_id) == delivered

        drain(orch, saga_id)
        finished = orch.history(saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved", {"by": "again"})
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "rejected")
        assert orch.history(saga_id) == finished

        # A repeat of an early event (delivered while pending) is refused too.
        early = orch.start(approve, trip)
        orch.send(early, "approved", {"by": "early"})
        with pytest.raises(UnexpectedEvent):
            orch.send(early, "approved", {"by": "early"})
        assert types(orch, early) == ["SagaStarted", "EventReceived"]


def test_wait_timeout_compensates(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A wait_for whose timeout passes undoes the steps before it and ends compensated."""
    approve = approval_saga(rec, timeout=0.2)
    with Orchestrator(sagas=[approve], database=database_url) as orch:
        saga_id = orch.start(approve, trip)
        began = time.monotonic()
        (status,) = drain(orch, saga_id)
        elapsed = time.monotonic() - began
        kinds = types(orch, saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved")

    assert status.state is SagaState.COMPENSATED
    assert rec.calls == ["prepare", "undo_prepare"]
    assert step_states(status) == {"prepare": "compensated", "approval": "failed", "finish": "pending"}
    assert "WaitTimedOut" in kinds
    assert kinds[-1] == "SagaCompensated"
    assert elapsed >= 0.2


def test_wait_timeout_continue_completes(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A wait_for(on_timeout="continue") whose timeout passes carries on to completion without the event."""
    approve = approval_saga(rec, timeout=timedelta(seconds=0.2), on_timeout="continue")
    with Orchestrator(sagas=[approve], database=database_url) as orch:
        saga_id = orch.start(approve, trip)
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
        finished = orch.history(saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved", {"by": "late"})
        assert orch.history(saga_id) == finished

    assert status.state is SagaState.COMPLETED
    assert rec.calls == ["prepare", "finish"]
    assert rec.seen["received"] == {}
    assert "WaitTimedOut" in kinds
    assert kinds[-1] == "SagaCompleted"


# Cancelling


def test_cancel_while_waiting_compensates_and_ends_cancelled(database_url: str, rec: Recorder, trip: Trip) -> None:
    """cancel() on a waiting saga undoes what was done and ends cancelled; it then takes no events or cancels."""
    approve = approval_saga(rec)
    with Orchestrator(sagas=[approve], database=database_url) as orch:
        saga_id = orch.start(approve, trip)
        settle(orch, saga_id, SagaState.WAITING)
        orch.cancel(saga_id, reason="customer changed their mind")
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved", {"by": "manager"})  # no longer waits: it is turning back
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
        with pytest.raises(InvalidTransition):
            orch.cancel(saga_id)
        with pytest.raises(UnexpectedEvent):
            orch.send(saga_id, "approved", {"by": "manager"})
        assert types(orch, saga_id) == kinds

    assert status.state is SagaState.CANCELLED
    assert rec.calls == ["prepare", "undo_prepare"]
    assert step_states(status)["prepare"] == "compensated"
    assert step_states(status)["finish"] == "pending"
    assert kinds[-1] == "SagaCancelled"
    assert "customer changed their mind" in (status.error or "")


def test_cancel_of_a_finished_saga_is_an_invalid_transition(database_url: str, rec: Recorder, trip: Trip) -> None:
    """cancel() on a completed or compensated saga raises InvalidTransition and writes nothing."""
    done_saga = undo_saga(rec, fail_at="nowhere")
    failing = undo_saga(rec)
    with Orchestrator(sagas=[done_saga], database=database_url) as orch:
        done = orch.start(done_saga, trip)
        drain(orch, done)
        before = orch.history(done)
        with pytest.raises(InvalidTransition):
            orch.cancel(done)
        assert orch.history(done) == before
    with Orchestrator(sagas=[failing], database=database_url) as orch:
        undone = orch.start(failing, trip)
        (status,) = drain(orch, undone)
        with pytest.raises(InvalidTransition):
            orch.cancel(undone)
    assert status.state is SagaState.COMPENSATED


def test_cancel_of_a_pending_saga_runs_nothing(database_url: str, rec: Recorder, trip: Trip) -> None:
    """cancel() before any step ran ends the saga cancelled without running a step or compensation."""
    undo = undo_saga(rec)
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        saga_id = orch.start(undo, trip)
        orch.cancel(saga_id)
        orch.cancel(saga_id)  # a repeated cancel is a no-op
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
    assert status.state is SagaState.CANCELLED
    assert rec.calls == []
    assert kinds == ["SagaStarted", "CancelRequested", "SagaCancelled"]
    assert {s.state for s in status.steps} == {StepState.PENDING}


def test_cancel_while_a_step_runs_undoes_it_too(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A cancel recorded while a step is in flight lets it finish, then undoes it and the earlier steps."""
    holder: dict[str, Orchestrator] = {}

    class Cancelled(Saga[Trip]):
        @step(retry=FAST)
        def a(self, trip: Trip) -> None:
            rec.call("a")

        @a.compensate
        def undo_a(self, trip: Trip, out: None) -> None:
            rec.call("undo_a")

        @step(retry=FAST)
        def b(self, trip: Trip) -> str:
            rec.call("b")
            holder["orch"].cancel(self.saga_id)  # the operator cancels while b is in flight
            return "b"

        @b.compensate
        def undo_b(self, trip: Trip, out: str) -> None:
            rec.call("undo_b")

        @step(retry=FAST)
        def c(self, trip: Trip) -> None:
            rec.call("c")

    with Orchestrator(sagas=[Cancelled], database=database_url) as orch:
        holder["orch"] = orch
        saga_id = orch.start(Cancelled, trip)
        (status,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)

    assert status.state is SagaState.CANCELLED
    assert rec.calls == ["a", "b", "undo_b", "undo_a"]
    assert step_states(status) == {"a": "compensated", "b": "compensated", "c": "pending"}
    assert kinds.count("StepSucceeded") == 2
    assert kinds[-1] == "SagaCancelled"


def test_cancel_between_retries_leaves_no_step_running(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A saga cancelled while a step waits for its retry ends cancelled with no step shown as running."""
    slow_retry = RetryPolicy(max_attempts=3, initial_interval=30, max_interval=30)

    class Backoff(Saga[Trip]):
        @step(retry=FAST)
        def a(self, trip: Trip) -> None:
            rec.call("a")

        @a.compensate
        def undo_a(self, trip: Trip, out: None) -> None:
            rec.call("undo_a")

        @step(retry=slow_retry)
        def b(self, trip: Trip) -> None:
            rec.call("b")
            raise ConnectionError("blip")

    with Orchestrator(sagas=[Backoff], database=database_url) as orch:
        saga_id = orch.start(Backoff, trip)
        orch.run_worker(wait=False, poll_interval=0.01)  # a succeeds, b fails once and backs off 30 s
        assert types(orch, saga_id)[-1] == "StepAttemptFailed"
        orch.cancel(saga_id)
        (status,) = drain(orch, saga_id, timeout=5)

    assert status.state is SagaState.CANCELLED
    assert rec.calls == ["a", "b", "undo_a"]
    assert step_states(status)["a"] == "compensated"
    assert StepState.RUNNING not in {s.state for s in status.steps}


# Delayed start, status and listing


def test_delayed_start_runs_nothing_before_start_at(database_url: str, rec: Recorder, trip: Trip) -> None:
    """start(start_at=...) leaves the saga pending and unrun until that time, then it completes."""
    undo = undo_saga(rec, fail_at="nowhere")
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        start_at = datetime.now(UTC) + timedelta(seconds=0.5)
        saga_id = orch.start(undo, trip, start_at=start_at)
        orch.run_worker(wait=False, poll_interval=0.01)
        early = orch.status(saga_id)
        early_types = types(orch, saga_id)
        early_calls = list(rec.calls)
        (status,) = drain(orch, saga_id)

        with pytest.raises(InvalidInput):
            orch.start(undo, trip, saga_id="naive", start_at=datetime.now() + timedelta(seconds=1))
        with pytest.raises(SagaNotFound):
            orch.status("naive")
        assert [s.saga_id for s in orch.list()] == [saga_id]

    assert early.state is SagaState.PENDING
    assert early_types == ["SagaStarted"]
    assert early_calls == []
    assert status.state is SagaState.COMPLETED
    assert rec.seen["reserve_at"] >= start_at


def test_status_is_readable_right_after_start(database_url: str, rec: Recorder, trip: Trip) -> None:
    """status() right after start() shows the saga pending with every step pending (read-your-writes)."""
    undo = undo_saga(rec)
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        saga_id = orch.start(undo, trip, saga_id="fresh")
        status = orch.status(saga_id)
        listed = orch.list()

    assert status.saga_id == "fresh"
    assert status.saga == "Undo"
    assert status.state is SagaState.PENDING
    assert [s.name for s in status.steps] == ["reserve", "notify", "hold", "charge", "ship"]
    assert {s.state for s in status.steps} == {StepState.PENDING}
    assert status.result == {}
    assert status.error is None
    assert status.created_at.tzinfo is not None
    assert [s.saga_id for s in listed] == ["fresh"]


def test_list_filters_by_state_saga_and_limit(database_url: str, rec: Recorder, trip: Trip) -> None:
    """list() filters by state and saga (class or name) and honours limit; a bogus state raises InvalidInput."""
    undo = undo_saga(rec, fail_at="nowhere")
    approve = approval_saga(rec)
    with Orchestrator(sagas=[undo, approve], database=database_url) as orch:
        done = [orch.start(undo, trip, saga_id=f"done-{i}") for i in range(2)]
        drain(orch, *done)
        parked = orch.start(approve, trip, saga_id="parked")
        settle(orch, parked, SagaState.WAITING)
        pending = orch.start(approve, trip, saga_id="pending", start_at=datetime.now(UTC) + timedelta(hours=1))

        completed = {s.saga_id for s in orch.list(state="completed")}
        waiting = [s.saga_id for s in orch.list(state=SagaState.WAITING)]
        pendings = [s.saga_id for s in orch.list(state="pending")]
        approvals = {s.saga_id for s in orch.list(saga=approve)}
        undos = {s.saga_id for s in orch.list(saga="Undo")}
        both = [s.saga_id for s in orch.list(state="waiting", saga="Approve")]
        none = orch.list(state="completed", saga="Approve")
        every = orch.list()
        one = orch.list(limit=1)
        two = orch.list(saga="Undo", limit=2)
        with pytest.raises(InvalidInput):
            orch.list(state="bogus")
        with pytest.raises(UnknownSaga):
            orch.list(saga="NoSuchSaga")

    assert completed == set(done)
    assert waiting == [parked]
    assert pendings == [pending]
    assert approvals == {parked, pending}
    assert undos == set(done)
    assert both == [parked]
    assert none == []
    assert len(every) == 4
    assert all(isinstance(s, SagaStatus) for s in every)
    assert len(one) == 1
    assert len(two) == 2


def test_wait_times_out_or_returns_the_terminal_status(database_url: str, rec: Recorder, trip: Trip) -> None:
    """wait(timeout=0.1) raises TimeoutError on a saga that is not terminal and returns the status of one that is."""
    undo = undo_saga(rec, fail_at="nowhere")
    with Orchestrator(sagas=[undo], database=database_url) as orch:
        saga_id = orch.start(undo, trip)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            orch.wait(saga_id, timeout=0.1)
        waited = time.monotonic() - began
        drain(orch, saga_id)
        status = orch.wait(saga_id, timeout=0.1)
        with pytest.raises(SagaNotFound):
            orch.wait("ghost", timeout=0.1)

    assert 0.1 <= waited < 2.0
    assert status.state is SagaState.COMPLETED
    assert status.saga_id == saga_id


# async steps and step timeouts


def test_async_steps_and_compensations_behave_like_sync_ones(database_url: str, rec: Recorder, trip: Trip) -> None:
    """async def steps and compensations run in order, get retried, see results, and are compensated."""

    class Async(Saga[Trip]):
        @step(retry=FAST)
        async def a(self, trip: Trip) -> Reservation:
            await asyncio.sleep(0)
            rec.call("a")
            return Reservation(id="A", nights=1)

        @a.compensate
        async def undo_a(self, trip: Trip, reservation: Reservation) -> None:
            await asyncio.sleep(0)
            rec.seen["undo_a_arg"] = reservation
            rec.call("undo_a")

        @step(retry=FAST)
        async def b(self, trip: Trip) -> str:
            rec.call("b")
            if self.attempt < 2:
                raise ConnectionError("blip")
            return self.results["a"].id

        @step(retry=FAST)
        async def c(self, trip: Trip) -> None:
            rec.call("c")
            raise NonRetryable("stop")

    with Orchestrator(sagas=[Async], database=database_url) as orch:
        saga_id = orch.start(Async, trip)
        (status,) = drain(orch, saga_id)

    assert rec.calls == ["a", "b", "b", "c", "undo_a"]
    assert status.state is SagaState.COMPENSATED
    assert status.result["b"] == "A"
    assert rec.seen["undo_a_arg"] == Reservation(id="A", nights=1)
    assert step_states(status) == {"a": "compensated", "b": "succeeded", "c": "failed"}


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_step_timeout_counts_as_a_failed_attempt(database_url: str, rec: Recorder, trip: Trip, kind: str) -> None:
    """An attempt that outlives the step's timeout fails with TimeoutError and is retried per the policy."""

    if kind == "async":

        class Slow(Saga[Trip]):
            @step(retry=FAST, timeout=timedelta(seconds=0.2))
            async def slow(self, trip: Trip) -> int:
                rec.call("slow")
                if self.attempt < 3:
                    await asyncio.sleep(2.0)
                return self.attempt

    else:

        class Slow(Saga[Trip]):  # type: ignore[no-redef]
            @step(retry=FAST, timeout=0.2)
            def slow(self, trip: Trip) -> int:
                rec.call("slow")
                if self.attempt < 3:
                    time.sleep(1.0)
                return self.attempt

    with Orchestrator(sagas=[Slow], database=database_url) as orch:
        saga_id = orch.start(Slow, trip)
        began = time.monotonic()
        (status,) = drain(orch, saga_id)
        elapsed = time.monotonic() - began
        failures = [e.data["error"] for e in orch.history(saga_id) if e.type == "StepAttemptFailed"]

    assert status.state is SagaState.COMPLETED
    assert status.result == {"slow": 3}
    assert status.steps[0].attempts == 3
    assert len(failures) == 2
    assert all("TimeoutError" in error for error in failures)
    assert elapsed < 1.5  # the timed-out attempts were not waited for


def test_step_timeout_exhausting_retries_fails_the_step(database_url: str, rec: Recorder, trip: Trip) -> None:
    """A step that times out on every attempt fails for good with TimeoutError in its last_error."""

    class AlwaysSlow(Saga[Trip]):
        @step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.05), timeout=0.1)
        async def slow(self, trip: Trip) -> None:
            rec.call("slow")
            await asyncio.sleep(1.0)

    with Orchestrator(sagas=[AlwaysSlow], database=database_url) as orch:
        saga_id = orch.start(AlwaysSlow, trip)
        (status,) = drain(orch, saga_id)

    assert status.state is SagaState.COMPENSATED
    assert status.steps[0].state is StepState.FAILED
    assert status.steps[0].attempts == 2
    assert "TimeoutError" in (status.steps[0].last_error or "")
    assert rec.counts == Counter(slow=2)


# Domain events


def test_emitted_events_are_recorded_before_the_step_succeeds(database_url: str, rec: Recorder, trip: Trip) -> None:
    """self.emit() records a DomainEventEmitted before StepSucceeded; an emit of a failed attempt is dropped."""

    class Emits(Saga[Trip]):
        @step(retry=FAST)
        def ship(self, trip: Trip) -> None:
            self.emit(Attempted(attempt=self.attempt))
            if self.attempt == 1:
                raise ConnectionError("blip")
            self.emit(Shipped(parcel=f"P-{trip.hotel}"))
            self.emit({"note": "left the warehouse"}, name="Dispatched")

        @step(retry=ONCE)
        def doomed(self, trip: Trip) -> None:
            self.emit(Shipped(parcel="never"))
            raise NonRetryable("no")

    with Orchestrator(sagas=[Emits], database=database_url) as orch:
        saga_id = orch.start(Emits, trip)
        (status,) = drain(orch, saga_id)
        history = orch.history(saga_id)

    assert status.state is SagaState.COMPENSATED
    emitted = [(e.step, e.data["event"], e.data["data"]) for e in history if e.type == "DomainEventEmitted"]
    assert emitted == [
        ("ship", "Attempted", {"attempt": 2}),
        ("ship", "Shipped", {"parcel": "P-H1"}),
        ("ship", "Dispatched", {"note": "left the warehouse"}),
    ]
    kinds = [(e.type, e.step) for e in history if e.step == "ship"]
    assert kinds[-4:] == [
        ("DomainEventEmitted", "ship"),
        ("DomainEventEmitted", "ship"),
        ("DomainEventEmitted", "ship"),
        ("StepSucceeded", "ship"),
    ]
    assert ("StepAttemptFailed", "ship") in kinds


# The way out of ``failed``


def stuck_saga(rec: Recorder) -> Any:
    """a (undo) / b (undo always fails for good) / c, which fails: ends ``failed`` with ``a`` not undone."""

    class Stuck(Saga[Trip]):
        @step(retry=FAST)
        def a(self, trip: Trip) -> str:
            rec.call("a")
            return "a"

        @a.compensate
        def undo_a(self, trip: Trip, out: str) -> None:
            rec.call("undo_a")

        @step(retry=FAST)
        def b(self, trip: Trip) -> str:
            rec.call("b")
            return "b"

        @b.compensate
        def undo_b(self, trip: Trip, out: str) -> None:
            rec.call("undo_b")
            raise NonRetryable("the refund desk is closed")

        @step(retry=FAST)
        def c(self, trip: Trip) -> None:
            rec.call("c")
            raise NonRetryable("bad input")

    return Stuck


def test_cancel_without_compensation_ends_a_failed_saga_running_nothing(
    database_url: str, rec: Recorder, trip: Trip
) -> None:
    """cancel(compensate=False) ends a failed saga cancelled, with its own event and reason, and runs nothing."""
    stuck = stuck_saga(rec)
    with Orchestrator(sagas=[stuck], database=database_url) as orch:
        saga_id = orch.start(stuck, trip)
        (failed,) = drain(orch, saga_id)
        assert failed.state is SagaState.FAILED
        calls = list(rec.calls)
        orch.cancel(saga_id, "refunded by hand", compensate=False)
        (ended,) = drain(orch, saga_id)
        history = orch.history(saga_id)
        with pytest.raises(InvalidTransition):
            orch.cancel(saga_id, compensate=False)  # a cancelled saga has nothing left to end
    assert ended.state is SagaState.CANCELLED
    assert rec.calls == calls  # undo_a never ran
    assert history[-1].type == "SagaTerminated"
    assert history[-1].data["reason"] == "refunded by hand"
    assert "refunded by hand" in (ended.error or "")
    assert step_states(ended)["a"] == "succeeded"  # the history says what was not undone


def test_cancel_without_compensation_of_a_running_saga_drops_its_attempt(
    database_url: str, rec: Recorder, trip: Trip
) -> None:
    """cancel(compensate=False) during a step: the saga ends cancelled and the attempt's late outcome is dropped."""
    entered, leave = threading.Event(), threading.Event()

    class Slow(Saga[Trip]):
        @step(retry=FAST)
        def first(self, trip: Trip) -> str:
            rec.call("first")
            return "1"

        @first.compensate
        def undo_first(self, trip: Trip, out: str) -> None:
            rec.call("undo_first")

        @step(retry=FAST)
        def second(self, trip: Trip) -> str:
            entered.set()
            leave.wait(10)
            rec.call("second")
            return "2"

        @step(retry=FAST)
        def third(self, trip: Trip) -> None:
            rec.call("third")

    with Orchestrator(sagas=[Slow], database=database_url) as orch:
        saga_id = orch.start(Slow, trip)
        worker = threading.Thread(target=orch.run_worker, kwargs={"wait": False, "poll_interval": 0.01})
        worker.start()
        assert entered.wait(10)
        orch.cancel(saga_id, compensate=False)
        leave.set()
        worker.join(10)
        (ended,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
    assert ended.state is SagaState.CANCELLED
    assert rec.calls == ["first", "second"]
    assert "StepSucceeded" not in kinds[kinds.index("SagaTerminated") :]
    assert step_states(ended)["second"] == "failed"


def test_resolving_a_failed_compensation_runs_the_rest_of_the_undo(
    database_url: str, rec: Recorder, trip: Trip
) -> None:
    """resolve_compensation() marks the failed undo as done by hand; the earlier undos then run."""
    stuck = stuck_saga(rec)
    with Orchestrator(sagas=[stuck], database=database_url) as orch:
        saga_id = orch.start(stuck, trip)
        drain(orch, saga_id)
        with pytest.raises(InvalidTransition, match="failed: b"):
            orch.resolve_compensation(saga_id, "a")  # only the failed compensation can be resolved
        orch.resolve_compensation(saga_id, "b", "refunded by phone")
        (resolved,) = drain(orch, saga_id)
        kinds = types(orch, saga_id)
        with pytest.raises(InvalidTransition):
            orch.resolve_compensation(saga_id, "b")
    assert resolved.state is SagaState.COMPENSATED
    assert rec.calls[-1] == "undo_a"
    assert rec.calls.count("undo_b") == 1
    assert step_states(resolved) == {"a": "compensated", "b": "compensated", "c": "failed"}
    assert "CompensationResolved" in kinds
    assert "refunded by phone" in (resolved.steps[1].last_error or "")


def test_history_plan_shows_the_timeouts_steps_run_with(database_url: str, trip: Trip) -> None:
    """The plan recorded in SagaStarted carries each step's timeout, as the worker applies it."""

    class Timed(Saga[Trip]):
        @step(timeout=60)
        def slow(self, trip: Trip) -> None: ...

        @step
        def quick(self, trip: Trip) -> None: ...

    with Orchestrator(sagas=[Timed], database=database_url) as orch:
        saga_id = orch.start(Timed, trip)
        plan = orch.history(saga_id)[0].data["plan"]
    assert [(node["name"], node["timeout"]) for node in plan] == [("slow", 60.0), ("quick", None)]
