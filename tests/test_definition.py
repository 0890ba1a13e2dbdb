"""The saga definition API: what it accepts, and the mistakes it rejects when the class is created."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.definition import Compensation, Saga, StepDef, WaitDef, step, wait_for
from orchestrator.errors import DefinitionError
from orchestrator.registry import plan_of
from orchestrator.retry import RetryPolicy


class Trip(BaseModel):
    hotel: str = "H1"
    flight: str = "F1"


class BookTrip(Saga[Trip]):
    """A saga in the README's shape, used by the positive checks."""

    @step(retry=RetryPolicy(max_attempts=5, initial_interval=0.5, backoff=2.0, max_interval=30))
    def reserve_hotel(self, trip: Trip) -> str:
        return f"hotel {trip.hotel}"

    @reserve_hotel.compensate
    def cancel_hotel(self, trip: Trip, reservation: str) -> None:
        return None

    approval = wait_for("approved", timeout=timedelta(hours=4))

    @step(timeout=10)
    async def book_flight(self, trip: Trip) -> str:
        return f"flight {trip.flight}"

    @book_flight.compensate(retry=7)
    async def cancel_flight(self, trip: Trip, booking: str) -> None:
        return None

    @step
    def notify(self, trip: Trip) -> None:
        return None


# What the definition accepts


def test_nodes_are_in_declaration_order_and_waits_named_by_attribute() -> None:
    """``nodes`` lists steps and waits in the order of the class body; a wait takes its attribute's name."""
    assert [node.name for node in BookTrip.nodes] == ["reserve_hotel", "approval", "book_flight", "notify"]
    assert [type(node) for node in BookTrip.nodes] == [StepDef, WaitDef, StepDef, StepDef]
    assert BookTrip.approval.name == "approval"
    assert [node.name for node in BookTrip.steps()] == ["reserve_hotel", "book_flight", "notify"]
    assert BookTrip.waits() == {"approved": BookTrip.nodes[1]}


def test_saga_name_defaults_to_the_class_name() -> None:
    """Without ``name = ...`` the saga is called after its class; its input model comes from Saga[...]."""
    assert BookTrip.name == "BookTrip"
    assert BookTrip.input_model is Trip


def test_name_attribute_overrides_the_saga_name() -> None:
    """``name = "..."`` in the class body names the saga."""

    class Renamed(Saga[Trip]):
        name = "trip-booking"

        @step
        def only(self, trip: Trip) -> None:
            return None

    assert Renamed.name == "trip-booking"


@pytest.mark.parametrize("bad_name", ["", 42, "a\x00b", "two\nlines", "x" * 201, "   "])
def test_a_name_must_be_a_printable_string(bad_name: Any) -> None:
    """An empty, non-string, too long or unprintable ``name`` is refused."""
    with pytest.raises(DefinitionError, match="printable string of 1 to 200 characters"):

        class Bad(Saga[Trip]):
            name = bad_name

            @step
            def only(self, trip: Trip) -> None:
                return None


def test_bare_and_called_step_decorators_both_work() -> None:
    """``@step`` and ``@step()`` both make a step with the default policy and no timeout."""

    class Both(Saga[Trip]):
        @step
        def bare(self, trip: Trip) -> None:
            return None

        @step()
        def called(self, trip: Trip) -> None:
            return None

    bare, called = Both.steps()
    assert (bare.name, called.name) == ("bare", "called")
    assert bare.retry == called.retry == RetryPolicy()
    assert bare.timeout is None
    assert called.timeout is None


def test_step_retry_shorthands_are_normalised() -> None:
    """``retry=`` takes an int or a dict as well as a RetryPolicy."""

    class Shorthands(Saga[Trip]):
        @step(retry=4)
        def counted(self, trip: Trip) -> None:
            return None

        @step(retry={"max_attempts": 2, "initial_interval": 3})
        def fields(self, trip: Trip) -> None:
            return None

    counted, fields = Shorthands.steps()
    assert counted.retry == RetryPolicy(max_attempts=4)
    assert fields.retry == RetryPolicy(max_attempts=2, initial_interval=3)


def test_plain_compensate_reuses_the_step_policy() -> None:
    """``@<step>.compensate`` retries the compensation like its step."""
    hotel = BookTrip.steps()[0]
    assert isinstance(hotel.compensation, Compensation)
    assert hotel.compensation.retry is hotel.retry
    assert hotel.compensation.retry.max_attempts == 5
    assert plan_of(BookTrip)[0].compensation_max_attempts == 5


def test_compensate_with_retry_has_its_own_policy() -> None:
    """``@<step>.compensate(retry=...)`` gives the compensation its own policy, leaving the step's alone."""
    flight = BookTrip.steps()[1]
    assert flight.compensation is not None
    assert flight.compensation.retry == RetryPolicy(max_attempts=7)
    assert flight.retry == RetryPolicy()
    assert plan_of(BookTrip)[2].compensation_max_attempts == 7


def test_steps_without_compensation_have_none() -> None:
    """A step with no ``.compensate`` is not compensable in the plan."""
    notify = BookTrip.steps()[2]
    assert notify.compensation is None
    assert not plan_of(BookTrip)[3].compensable


def test_async_steps_and_compensations_are_detected() -> None:
    """``async def`` steps and compensations are flagged ``is_async``; plain ``def`` ones are not."""
    hotel, flight, notify = BookTrip.steps()
    assert [hotel.is_async, flight.is_async, notify.is_async] == [False, True, False]
    assert flight.compensation is not None
    assert hotel.compensation is not None
    assert [hotel.compensation.is_async, flight.compensation.is_async] == [False, True]


def test_durations_accept_timedelta() -> None:
    """Step and wait timeouts and policy intervals take a timedelta as well as seconds."""

    class Timed(Saga[Trip]):
        @step(timeout=timedelta(seconds=90), retry=RetryPolicy(initial_interval=timedelta(milliseconds=500)))
        def slow(self, trip: Trip) -> None:
            return None

        approval = wait_for("approved", timeout=timedelta(minutes=5))

    assert Timed.steps()[0].timeout == 90.0
    assert Timed.steps()[0].retry.initial_interval == 0.5
    assert Timed.waits()["approved"].timeout == 300.0
    assert BookTrip.waits()["approved"].timeout == 4 * 3600.0
    assert BookTrip.steps()[1].timeout == 10.0


def test_wait_defaults() -> None:
    """A wait without a timeout waits for ever and compensates on timeout unless told to continue."""
    wait = wait_for("signed")
    assert (wait.event, wait.timeout, wait.on_timeout) == ("signed", None, "compensate")
    assert wait_for("signed", timeout=1, on_timeout="continue").on_timeout == "continue"


def test_subclass_inherits_input_model_and_appends_steps() -> None:
    """A subclass of a saga keeps its input model and runs the parent's steps before its own."""

    class Longer(BookTrip):
        @step
        def invoice(self, trip: Trip) -> None:
            return None

    assert Longer.input_model is Trip
    assert [node.name for node in Longer.nodes] == ["reserve_hotel", "approval", "book_flight", "notify", "invoice"]
    assert len(BookTrip.nodes) == 4


# What the definition rejects


def test_duplicate_step_names_are_rejected() -> None:
    """Two methods with the same name in one class body raise instead of the second silently winning."""
    with pytest.raises(DefinitionError, match="duplicate step name 'pay'"):

        class Twice(Saga[Trip]):
            @step
            def pay(self, trip: Trip) -> None:
                return None

            @step  # type: ignore[no-redef]
            def pay(self, trip: Trip) -> None:  # noqa: F811 (the mistake under test)
                return None


def test_a_wait_and_a_step_may_not_share_a_name() -> None:
    """A wait reassigned to a step's name is a duplicate too."""
    with pytest.raises(DefinitionError, match="duplicate step name"):

        class Clash(Saga[Trip]):
            @step
            def approval(self, trip: Trip) -> None:
                return None

            approval = wait_for("approved")  # type: ignore[assignment]  # noqa: F811 (the mistake under test)


def test_subclass_may_not_reuse_a_parent_step_name() -> None:
    """A subclass step named like an inherited one is a duplicate."""
    with pytest.raises(DefinitionError, match="duplicate step name 'notify'"):

        class Again(BookTrip):
            @step
            def notify(self, trip: Trip) -> None:
                return None


def test_step_bound_to_another_attribute_is_rejected() -> None:
    """A step whose function name differs from its attribute (``alias = step(fn)``) is refused."""

    def charge(self: Any, trip: Trip) -> None:
        return None

    with pytest.raises(DefinitionError, match="bound to the attribute 'alias'"):

        class Aliased(Saga[Trip]):
            alias = step(charge)


def test_compensation_for_a_step_of_another_saga_is_rejected() -> None:
    """A compensation that undoes a step of a different saga class fails the class that declares it."""

    class Other(Saga[Trip]):
        @step
        def foreign(self, trip: Trip) -> None:
            return None

    with pytest.raises(DefinitionError, match="not a step of this saga"):

        class Thief(Saga[Trip]):
            @step
            def mine(self, trip: Trip) -> None:
                return None

            @Other.foreign.compensate
            def undo_foreign(self, trip: Trip, result: None) -> None:
                return None


def test_rejected_foreign_compensation_leaves_the_other_saga_alone() -> None:
    """After a class is rejected for compensating another saga's step, that saga's step is unchanged."""

    class Victim(Saga[Trip]):
        @step
        def foreign(self, trip: Trip) -> None:
            return None

    with pytest.raises(DefinitionError):

        class Thief(Saga[Trip]):
            @step
            def mine(self, trip: Trip) -> None:
                return None

            @Victim.foreign.compensate
            def undo_foreign(self, trip: Trip, result: None) -> None:
                return None

    assert Victim.steps()[0].compensation is None
    assert not plan_of(Victim)[0].compensable


def test_subclass_compensation_does_not_change_the_parent() -> None:
    """A subclass that adds a compensation to an inherited step leaves the parent saga's plan as it was."""

    class Parent(Saga[Trip]):
        @step
        def charge(self, trip: Trip) -> None:
            return None

    class Child(Parent):
        @Parent.charge.compensate
        def refund(self, trip: Trip, result: None) -> None:
            return None

    assert plan_of(Child)[0].compensable
    assert not plan_of(Parent)[0].compensable


def test_two_compensations_for_one_step_are_rejected() -> None:
    """A step has at most one compensation."""
    with pytest.raises(DefinitionError, match=r"two compensations|already has a compensation"):

        class Undo2(Saga[Trip]):
            @step
            def pay(self, trip: Trip) -> None:
                return None

            @pay.compensate
            def refund(self, trip: Trip, result: None) -> None:
                return None

            @pay.compensate
            def refund_again(self, trip: Trip, result: None) -> None:
                return None


def test_saga_without_steps_is_rejected() -> None:
    """A saga must have at least one step (a wait alone is not enough)."""
    with pytest.raises(DefinitionError, match="has no @step"):

        class Empty(Saga[Trip]):
            approval = wait_for("approved")


def test_saga_without_input_model_is_rejected() -> None:
    """A saga must name its input model: ``class X(Saga[Input])``."""
    with pytest.raises(DefinitionError, match="must name its input model"):

        class Untyped(Saga):  # type: ignore[type-arg]
            @step
            def go(self, trip: Trip) -> None:
                return None


@pytest.mark.parametrize("model", [int, dict[str, int], "Trip"])
def test_non_pydantic_input_model_is_rejected(model: Any) -> None:
    """``Saga[...]`` takes a pydantic model, not a builtin, a generic alias or a string."""
    with pytest.raises(DefinitionError, match="takes a pydantic model"):

        class Wrong(Saga[model]):
            @step
            def go(self, trip: Trip) -> None:
                return None


@pytest.mark.parametrize(
    "retry",
    [
        0,
        {"max_attempts": 0},
        {"initial_interval": -1},
        {"initial_interval": 10, "max_interval": 5},
        {"backoff": 0.5},
        "x",
        True,
    ],
)
def test_bad_step_retry_is_rejected(retry: Any) -> None:
    """An invalid retry policy or shorthand on a step raises DefinitionError."""
    with pytest.raises(DefinitionError):

        class BadRetry(Saga[Trip]):
            @step(retry=retry)
            def go(self, trip: Trip) -> None:
                return None


@pytest.mark.parametrize("retry", [0, {"max_interval": -1}, "x"])
def test_bad_compensation_retry_is_rejected(retry: Any) -> None:
    """An invalid retry on ``.compensate(retry=...)`` raises DefinitionError."""
    with pytest.raises(DefinitionError):

        class BadUndo(Saga[Trip]):
            @step
            def go(self, trip: Trip) -> None:
                return None

            @go.compensate(retry=retry)
            def undo(self, trip: Trip, result: None) -> None:
                return None


@pytest.mark.parametrize("timeout", [0, -1, 0.0, timedelta(0), timedelta(seconds=-5)])
def test_non_positive_step_timeout_is_rejected(timeout: Any) -> None:
    """A step timeout must be positive."""
    with pytest.raises(DefinitionError, match="step timeout must be positive"):

        class BadTimeout(Saga[Trip]):
            @step(timeout=timeout)
            def go(self, trip: Trip) -> None:
                return None


def test_non_numeric_step_timeout_is_rejected() -> None:
    """A step timeout that is neither seconds nor a timedelta is refused."""
    with pytest.raises(DefinitionError, match="step timeout"):
        step(timeout="10")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("",), {}, "needs an event name"),
        ((None,), {}, "needs an event name"),
        (("ev\x00t",), {}, "needs an event name"),
        (("x" * 201,), {}, "needs an event name"),
        (("approved",), {"timeout": 0}, "must be positive"),
        (("approved",), {"timeout": timedelta(seconds=-1)}, "must be positive"),
        (("approved",), {"on_timeout": "ignore"}, "on_timeout must be"),
    ],
)
def test_bad_waits_are_rejected(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    """wait_for needs an event name, a positive timeout and a known on_timeout."""
    with pytest.raises(DefinitionError, match=message):
        wait_for(*args, **kwargs)


def test_two_waits_for_one_event_are_rejected() -> None:
    """Two waits for the same event would make ``send`` ambiguous."""
    with pytest.raises(DefinitionError, match="same event"):

        class Twice(Saga[Trip]):
            first = wait_for("approved")

            @step
            def go(self, trip: Trip) -> None:
                return None

            second = wait_for("approved")


def test_step_decorates_callables_only() -> None:
    """``step`` applied to something that is not a function is refused."""
    with pytest.raises(DefinitionError, match="decorates a method"):
        step()(42)  # type: ignore[arg-type]


def test_compensation_with_the_wrong_signature_fails_at_import() -> None:
    """A compensation that cannot take (input, result) is refused when its class is created, naming class,
    method and file."""
    with pytest.raises(
        DefinitionError, match=r"Bad\.undo_a \(.*test_definition\.py:\d+\).*undo_a\(self, input, result\)"
    ):

        class Bad(Saga[Trip]):
            @step
            def a(self, trip: Trip) -> None: ...

            @a.compensate
            def undo_a(self) -> None: ...


def test_step_without_an_input_parameter_fails_at_import() -> None:
    """A step that cannot take the saga input is refused when its class is created."""
    with pytest.raises(DefinitionError, match=r"NoInput\.a .*a step is called as a\(self, input\)"):

        class NoInput(Saga[Trip]):
            @step
            def a(self) -> None: ...


def test_step_with_a_required_extra_parameter_fails_at_import() -> None:
    """A step that needs more arguments than the engine passes is refused."""
    with pytest.raises(DefinitionError, match="missing a required argument: 'extra'"):

        class Extra(Saga[Trip]):
            @step
            def a(self, trip: Trip, extra: int) -> None: ...


def test_flexible_signatures_are_accepted() -> None:
    """Defaults and *args are fine: the engine's call binds to them."""

    class Loose(Saga[Trip]):
        @step
        def a(self, trip: Trip, verbose: bool = False) -> None: ...

        @a.compensate
        def undo_a(self, *args: Any) -> None: ...

    assert Loose.step_map["a"].compensation is not None
