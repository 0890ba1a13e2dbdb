"""The pure core: the fold of a saga's events, ``next_action`` and the aggregate's commands, with no I/O.

The property tests drive a ``SagaAggregate`` with a fake clock through outcomes, deaths of workers,
cancellations and sent events drawn by hypothesis, then check the recorded history.
"""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eventsourcing.persistence import JSONTranscoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from orchestrator import SagaState, SagaStatus, StepState
from orchestrator import events as ev
from orchestrator.aggregate import Outcome, SagaAggregate, Work
from orchestrator.definition import Saga, StepDef, WaitDef, step, wait_for
from orchestrator.machine import Finish, Run, SagaRun, Sleep, StartWait, next_action
from orchestrator.readmodels.status import status_document, status_of
from orchestrator.registry import policies_of
from orchestrator.retry import RetryPolicy

LEASE = 30.0
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
MAX_RETRIES = 2  # operator retries of a failed saga per run
SECOND = timedelta(seconds=1)


class Payload(BaseModel):
    n: int = 0


def fixed_policy(max_attempts: int) -> RetryPolicy:
    """A policy without jitter, so every run of a drawn example records the same history."""
    return RetryPolicy(max_attempts=max_attempts, initial_interval=1, backoff=2, max_interval=8, jitter=0)


# Saga classes built from a drawn plan


@dataclass(frozen=True)
class StepSpec:
    max_attempts: int
    compensation_attempts: int | None  # None: the step has no compensation
    doomed: bool = False  # every attempt fails, so the saga turns back here (makes compensation common)


@dataclass(frozen=True)
class WaitSpec:
    timeout: float | None
    on_timeout: str


def _method(name: str) -> Callable[..., None]:
    def method(self: Any, payload: Payload, *result: Any) -> None:
        return None

    method.__name__ = method.__qualname__ = name
    return method


def build_saga(specs: Sequence[StepSpec | WaitSpec]) -> type[Saga[Payload]]:
    """A saga class with node ``n<i>`` for each spec (a step, or a wait for event ``e<i>``)."""

    def body(namespace: dict[str, Any]) -> None:
        for index, spec in enumerate(specs):
            name = f"n{index}"
            if isinstance(spec, WaitSpec):
                namespace[name] = wait_for(f"e{index}", timeout=spec.timeout, on_timeout=spec.on_timeout)  # type: ignore[arg-type]
                continue
            node = step(retry=fixed_policy(spec.max_attempts))(_method(name))
            namespace[name] = node
            if spec.compensation_attempts is not None:
                undo = node.compensate(retry=fixed_policy(spec.compensation_attempts))
                namespace[f"undo_{name}"] = undo(_method(f"undo_{name}"))

    return types.new_class("Generated", (Saga[Payload],), {}, body)


step_specs = st.builds(
    StepSpec,
    max_attempts=st.integers(1, 3),
    compensation_attempts=st.sampled_from([1, None, 2, 3]),
)
wait_specs = st.builds(
    WaitSpec,
    timeout=st.sampled_from([None, 5.0, 45.0]),
    on_timeout=st.sampled_from(["compensate", "continue"]),
)


@st.composite
def plans(draw: st.DrawFn) -> list[StepSpec | WaitSpec]:
    """One to five steps with up to two waits among them; in about half the plans the last step is doomed."""
    steps = draw(st.lists(step_specs, min_size=1, max_size=5))
    if draw(st.booleans()):
        steps[-1] = dataclasses.replace(steps[-1], doomed=True)
    specs: list[StepSpec | WaitSpec] = list(steps)
    for position, wait in draw(st.lists(st.tuples(st.integers(0, 5), wait_specs), max_size=2)):
        specs.insert(min(position, len(specs)), wait)
    return specs


# The driver: a worker, an operator and a sender, all on a fake clock

# The first entry of each list is what hypothesis shrinks towards: the quiet case.
FATES = ["ok"] * 5 + ["transient", "permanent", "died", "late", "slow"]
FAILURES = ["transient", "permanent", "died"]
INTERJECTIONS = ["none"] * 5 + ["send"]  # an event sent before the saga waits for it


@dataclass
class Trace:
    """What a driven saga did: its aggregate, its history and the fate the driver gave each attempt."""

    saga: type[Saga[Any]]
    aggregate: SagaAggregate
    events: list[ev.SagaEvent]
    fates: dict[tuple[str, str], list[str]]
    iterations: int
    retries: int = 0


@dataclass
class Driver:
    """A worker, an operator and a sender in one: obeys the aggregate and draws every choice from hypothesis."""

    data: st.DataObject
    saga: type[Saga[Any]]
    aggregate: SagaAggregate
    now: datetime
    doomed: set[str]
    cancel_at: int | None  # the iteration at which the operator cancels, if any
    cancel_midflight: bool  # ... while an attempt is in flight, if one is claimed then
    fates: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    retries: int = 0

    def __post_init__(self) -> None:
        self.policies = policies_of(self.saga)

    def can_cancel(self) -> bool:
        """What ``Orchestrator.cancel`` allows: a saga neither finished nor already turning back."""
        run = self.aggregate.run
        return not run.state.terminal and not run.cancel_requested and not run.compensating

    def expected_events(self) -> list[str]:
        return [wait.event for wait in self.saga.waits().values() if self.aggregate.run.expects(wait.event)]

    def cancel(self) -> None:
        self.aggregate.cancel("changed my mind", self.now)

    def send(self) -> None:
        awaited = self.aggregate.run.waiting_for
        events = sorted(self.expected_events(), key=lambda event: event != awaited)  # the awaited one first
        event = self.data.draw(st.sampled_from(events), label="event")
        self.aggregate.deliver(event, {"by": "tester"}, self.now)

    def run(self, limit: int) -> Trace:
        """Advance the saga until it is terminal, for at most ``limit`` iterations."""
        for iteration in range(limit):
            check_pure(self.aggregate.run, self.now)
            state = self.aggregate.run.state
            if state.terminal:
                if (
                    state is SagaState.FAILED
                    and self.retries < MAX_RETRIES
                    and self.data.draw(st.sampled_from([True, False]), label="retry")
                ):
                    self.aggregate.retry(self.now)
                    self.retries += 1
                    continue
                events = [event for event in self.aggregate.collect_events() if isinstance(event, ev.SagaEvent)]
                return Trace(self.saga, self.aggregate, events, dict(self.fates), iteration, self.retries)
            cancel_now = iteration == self.cancel_at and self.can_cancel()
            if cancel_now and not self.cancel_midflight:
                self.cancel()
            interjection = self.data.draw(st.sampled_from(INTERJECTIONS), label="interjection")
            if interjection == "send" and self.expected_events():
                self.send()
            work = self.aggregate.advance(self.now, "w", LEASE, self.policies)
            if cancel_now and self.cancel_midflight and self.can_cancel():
                self.cancel()
                if work is None:
                    continue
            if work is None and not self.aggregate.run.state.terminal:
                self.idle()
            elif work is not None:
                self.resolve(work)
        raise AssertionError(f"saga not terminal after {limit} iterations: {self.aggregate.run.state}")

    def idle(self) -> None:
        """Nothing to run now: deliver an event to a parked saga, cancel it, or move the clock to the next due time."""
        run = self.aggregate.run
        parked = run.waiting_for is not None and self.expected_events()
        if parked and self.data.draw(st.sampled_from(["send", "send", "send", "lapse"]), label="parked") == "send":
            self.send()
            return
        if run.due_at is None:  # parked without a timeout: only an event or a cancel wakes it
            assert self.can_cancel(), "a saga parked with nothing that can wake it"
            self.cancel()
            return
        assert run.due_at > self.now, "advance returned nothing although something was due"
        self.now = run.due_at + self.data.draw(st.sampled_from([0, 0, 1, 7]), label="overshoot") * SECOND

    def resolve(self, work: Work) -> None:
        """Finish the claimed attempt as the drawn fate says."""
        flight = self.aggregate.run.in_flight
        assert flight is not None
        assert (flight.kind, flight.name, flight.attempt) == (work.kind, work.name, work.attempt)
        doomed = work.kind == "step" and work.name in self.doomed
        fate = self.data.draw(st.sampled_from(FAILURES if doomed else FATES), label="fate")
        self.fates[(work.kind, work.name)].append(fate)
        lease_until = flight.lease_until
        if fate == "died":  # never recorded: the next advance finds the lease expired
            self.now = lease_until
            return
        if fate == "late":  # recorded after the lease ran out, but before anyone else took over
            self.now = lease_until + SECOND
        elif fate == "slow":  # a long attempt that renewed its lease in time
            assert self.aggregate.renew(work, self.now + timedelta(seconds=2 * LEASE), self.now + SECOND)
            self.now = lease_until + SECOND
            before = len(self.aggregate.pending_events)
            assert self.aggregate.advance(self.now, "other", LEASE, self.policies) is None
            assert len(self.aggregate.pending_events) == before, "a renewed lease was treated as expired"
        else:
            self.now += SECOND
        if fate in ("ok", "late", "slow"):
            emitted = [{"name": "Done", "data": {"step": work.name}}] if work.kind == "step" else []
            outcome = Outcome(result={"step": work.name, "attempt": work.attempt}, emitted=emitted)
        elif fate == "transient":
            outcome = Outcome(error="TimeoutError: flaky")
        else:
            outcome = Outcome(error="NonRetryable: refused", retryable=False)
        assert self.aggregate.record_outcome(work, outcome, self.now, self.policies)


def check_pure(run: SagaRun, now: datetime) -> None:
    """``next_action`` gives the same answer twice and leaves the state untouched."""
    before = repr(run)  # the dataclass repr shows every field, nested ones included, and is cheap
    first = next_action(run, now)
    second = next_action(run, now)
    assert first == second
    assert repr(run) == before


def iteration_budget(saga: type[Saga[Any]]) -> int:
    """An upper bound on the driver's iterations: two per attempt and per wait, plus retries and slack."""
    attempts = 0
    for node in saga.steps():
        attempts += node.retry.max_attempts
        if node.compensation is not None:
            attempts += (MAX_RETRIES + 1) * node.compensation.retry.max_attempts
    return 2 * attempts + 4 * len(saga.waits()) + MAX_RETRIES + 4


def drive(data: st.DataObject, specs: Sequence[StepSpec | WaitSpec]) -> Trace:
    """Start a saga of the drawn plan and drive it to its end, cancelling it at a drawn iteration if so drawn."""
    saga = build_saga(specs)
    start_at = data.draw(st.sampled_from([None, T0 + 10 * SECOND]), label="start_at")
    aggregate = SagaAggregate.start(saga, "saga-1", {"n": 1}, T0, start_at)
    doomed = {f"n{index}" for index, spec in enumerate(specs) if isinstance(spec, StepSpec) and spec.doomed}
    cancel_at = data.draw(st.integers(0, 12), label="cancel at") if data.draw(st.booleans(), label="cancel") else None
    midflight = data.draw(st.booleans(), label="cancel mid-flight")
    return Driver(data, saga, aggregate, T0, doomed, cancel_at, midflight).run(iteration_budget(saga))


# Reading a history


def of_type(events: Sequence[object], *classes: type[ev.SagaEvent]) -> list[Any]:
    return [event for event in events if isinstance(event, classes)]


def turn_index(events: Sequence[ev.SagaEvent]) -> int | None:
    """Where the saga decided to turn back: a step failed for good, a wait timed out, or a cancel."""
    for index, event in enumerate(events):
        if isinstance(event, ev.StepFailed | ev.CancelRequested):
            return index
        if isinstance(event, ev.WaitTimedOut) and event.on_timeout == "compensate":
            return index
    return None


def expected_undo(trace: Trace) -> list[str]:
    """The compensations owed: succeeded steps that have one, last step first."""
    succeeded = {event.name for event in of_type(trace.events, ev.StepSucceeded)}
    return [node.name for node in reversed(trace.saga.steps()) if node.name in succeeded and node.compensation]


machine_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Properties: each check reads one driven run; the tests group them so that one drawn run serves several checks


def check_terminates(trace: Trace) -> None:
    """The saga is terminal within its plan's budget, settled for good, and its history is in time order."""
    run = trace.aggregate.run
    assert run.state.terminal
    assert trace.iterations <= iteration_budget(trace.saga)
    assert type(trace.events[-1]) is ev.TERMINAL_EVENTS[run.state]
    assert (run.in_flight, run.due_at, run.waiting_for, run.current_step()) == (None, None, None, None)
    assert next_action(run, run.updated_at + timedelta(days=365)) == Sleep(None)
    timestamps = [event.timestamp for event in trace.events]
    assert timestamps == sorted(timestamps)


def check_no_step_after_turning_back(trace: Trace) -> None:
    """After StepFailed, a compensating WaitTimedOut or CancelRequested, no StepStarted is recorded."""
    turn = turn_index(trace.events)
    if turn is not None:
        assert of_type(trace.events[turn:], ev.StepStarted) == []
        assert trace.aggregate.run.state is not SagaState.COMPLETED


def check_end_state_is_explained(trace: Trace) -> None:
    """completed iff all steps succeeded and nothing turned back; no node is left running; each end has its cause."""
    events, run = trace.events, trace.aggregate.run
    succeeded = {event.name for event in of_type(events, ev.StepSucceeded)}
    all_succeeded = succeeded == {node.name for node in trace.saga.steps()}
    cancels = of_type(events, ev.CancelRequested)
    timed_out = [e for e in of_type(events, ev.WaitTimedOut) if e.on_timeout == "compensate"]
    step_failures = of_type(events, ev.StepFailed)
    assert (run.state is SagaState.COMPLETED) == (all_succeeded and turn_index(events) is None)
    assert not [node.plan.name for node in run.nodes if node.state is StepState.RUNNING]
    if run.state is SagaState.COMPLETED:
        assert all(node.state is StepState.SUCCEEDED for node in run.nodes)
        assert run.error is None
    if run.state is SagaState.COMPENSATED:
        assert step_failures or timed_out
        assert not cancels
    if run.state is SagaState.CANCELLED:
        assert len(cancels) == 1
    if run.state is SagaState.FAILED:
        failures = of_type(events, ev.CompensationFailed)
        assert failures
        owed = expected_undo(trace)
        undone = [event.name for event in of_type(events, ev.CompensationSucceeded)]
        culprit = failures[-1].name
        assert culprit == owed[len(undone)]
        assert run.node(culprit).compensation_failed
        started_since = {e.name for e in of_type(events[events.index(failures[-1]) :], ev.CompensationStarted)}
        assert started_since.isdisjoint(owed[len(undone) :])
        assert all(run.node(name).state is StepState.SUCCEEDED for name in owed[len(undone) :])
    for undo_failure in of_type(events, ev.CompensationFailed):  # so does a compensation, within its budget
        end = events.index(undo_failure)
        retried = [index for index, event in enumerate(events[:end]) if isinstance(event, ev.SagaRetried)]
        epoch = events[retried[-1] if retried else 0 : end]
        tries = [e for e in of_type(epoch, ev.CompensationStarted) if e.name == undo_failure.name]
        fate = trace.fates[("compensation", undo_failure.name)][undo_failure.attempt - 1]
        assert fate == "permanent" or len(tries) == run.node(undo_failure.name).plan.compensation_max_attempts
    for failure in step_failures:  # a step fails for good only for a reason
        max_attempts = run.node(failure.name).plan.max_attempts
        fate = trace.fates[("step", failure.name)][failure.attempt - 1]
        cancelled_before = bool(cancels) and events.index(cancels[0]) < events.index(failure)
        assert failure.attempt == max_attempts or fate == "permanent" or cancelled_before
        assert run.node(failure.name).state is StepState.FAILED


def check_compensations(trace: Trace) -> None:
    """Compensations run only for succeeded steps that have one, last first, each succeeding at most once."""
    owed = expected_undo(trace)
    order = [node.name for node in trace.saga.steps()]
    started = [event.name for event in of_type(trace.events, ev.CompensationStarted)]
    undone = [event.name for event in of_type(trace.events, ev.CompensationSucceeded)]
    assert set(started) <= set(owed)
    positions = [order.index(name) for name in started]
    assert positions == sorted(positions, reverse=True)
    assert len(undone) == len(set(undone))
    assert undone == owed[: len(undone)]
    state = trace.aggregate.run.state
    if state in (SagaState.COMPENSATED, SagaState.CANCELLED):
        assert undone == owed
        compensated = [node.plan.name for node in trace.aggregate.run.nodes if node.state is StepState.COMPENSATED]
        assert sorted(compensated) == sorted(owed)
    if state is SagaState.COMPLETED:
        assert of_type(trace.events, ev.CompensationStarted, ev.CompensationFailed) == []


def check_attempts(trace: Trace) -> None:
    """Attempts are numbered 1, 2, ... up to max_attempts, a lost (lease-expired) one included; one outcome each."""
    events, run = trace.events, trace.aggregate.run
    for node in trace.saga.steps():
        attempts = [e.attempt for e in of_type(events, ev.StepStarted) if e.name == node.name]
        fates = trace.fates.get(("step", node.name), [])
        assert attempts == list(range(1, len(attempts) + 1))
        assert len(attempts) == len(fates) == run.node(node.name).attempts
        assert len(attempts) <= node.retry.max_attempts
        if fates and set(fates) <= {"transient", "died"} and not of_type(events, ev.CancelRequested):
            (failure,) = [e for e in of_type(events, ev.StepFailed) if e.name == node.name]
            assert failure.attempt == len(attempts) == node.retry.max_attempts
        for attempt, fate in enumerate(fates, start=1):
            outcomes = [
                e
                for e in of_type(events, ev.StepSucceeded, ev.StepAttemptFailed, ev.StepFailed)
                if (e.name, e.attempt) == (node.name, attempt)
            ]
            assert len(outcomes) == 1, f"attempt {attempt} of {node.name} has outcomes {outcomes}"
            if fate == "died":
                assert not isinstance(outcomes[0], ev.StepSucceeded)
                assert "lease expired" in outcomes[0].error
    epochs: list[list[ev.SagaEvent]] = [[]]  # each SagaRetried gives the failed compensation a fresh budget
    for event in events:
        if isinstance(event, ev.SagaRetried):
            epochs.append([])
        epochs[-1].append(event)
    for node in trace.saga.steps():
        if node.compensation is None:
            continue
        # Numbers are never reused, across retries too, so a late outcome cannot pass for a newer attempt's.
        attempts = [e.attempt for e in of_type(events, ev.CompensationStarted) if e.name == node.name]
        assert attempts == list(range(1, len(attempts) + 1))
        for epoch in epochs:
            started = [e for e in of_type(epoch, ev.CompensationStarted) if e.name == node.name]
            assert len(started) <= node.compensation.retry.max_attempts
            outcomes = of_type(epoch, ev.CompensationSucceeded, ev.CompensationAttemptFailed, ev.CompensationFailed)
            assert len([e for e in outcomes if e.name == node.name]) == len(started)


def check_replay(trace: Trace) -> None:
    """Events stored as JSON and read back fold to the same SagaRun and status; next_action is pure at every step."""
    mapper = ev.PydanticMapper(transcoder=JSONTranscoder())
    copies = [mapper.to_domain_event(mapper.to_stored_event(event)) for event in trace.events]
    assert [type(copy_) for copy_ in copies] == [type(event) for event in trace.events]
    replayed: SagaAggregate | None = None
    for event in copies:
        replayed = event.mutate(replayed)
        assert replayed is not None
        for offset in (0, 1, LEASE, 3600):
            check_pure(replayed.run, event.timestamp + timedelta(seconds=offset))
    assert replayed is not None
    assert replayed.run == trace.aggregate.run
    assert status_of(replayed.run) == status_of(trace.aggregate.run)
    assert SagaStatus.model_validate_json(status_document(replayed.run)) == status_of(replayed.run)
    assert replayed.version == trace.aggregate.version == len(trace.events)


@machine_settings
@given(specs=plans(), data=st.data())
def test_saga_terminates_in_a_state_its_history_explains(specs: list[StepSpec | WaitSpec], data: st.DataObject) -> None:
    """Any run ends terminal within budget, starts no step after turning back, and its end state has its causes."""
    trace = drive(data, specs)
    check_terminates(trace)
    check_no_step_after_turning_back(trace)
    check_end_state_is_explained(trace)


@machine_settings
@given(specs=plans(), data=st.data())
def test_compensations_and_attempts_follow_the_plan(specs: list[StepSpec | WaitSpec], data: st.DataObject) -> None:
    """Any run undoes exactly the succeeded compensable steps in reverse order, and never exceeds max_attempts."""
    trace = drive(data, specs)
    check_compensations(trace)
    check_attempts(trace)


@machine_settings
@given(specs=plans(), data=st.data())
def test_history_replays_to_the_same_state(specs: list[StepSpec | WaitSpec], data: st.DataObject) -> None:
    """Any run's history, stored and read back, folds to the live state, with next_action pure all along."""
    check_replay(drive(data, specs))


# Examples


class Order(BaseModel):
    item: str = "book"


class Fulfil(Saga[Order]):
    @step(retry=fixed_policy(3))
    def reserve(self, order: Order) -> str:
        return "r1"

    @reserve.compensate(retry=fixed_policy(2))
    def release(self, order: Order, reservation: str) -> None:
        return None

    @step(retry=fixed_policy(2))
    def charge(self, order: Order) -> None:
        return None

    @charge.compensate(retry=fixed_policy(1))
    def refund(self, order: Order, result: None) -> None:
        return None

    @step(retry=fixed_policy(1))
    def ship(self, order: Order) -> None:
        return None


class Approved(Saga[Order]):
    @step(retry=fixed_policy(1))
    def reserve(self, order: Order) -> None:
        return None

    @reserve.compensate(retry=fixed_policy(1))
    def release(self, order: Order, result: None) -> None:
        return None

    approval = wait_for("approved", timeout=60)
    shipping = wait_for("shipped", timeout=60, on_timeout="continue")

    @step(retry=fixed_policy(1))
    def invoice(self, order: Order) -> None:
        return None


FULFIL = policies_of(Fulfil)
APPROVED = policies_of(Approved)


def start(saga: type[Saga[Any]], start_at: datetime | None = None) -> SagaAggregate:
    return SagaAggregate.start(saga, "example", {"item": "book"}, T0, start_at)


def succeed(aggregate: SagaAggregate, now: datetime, policies: dict[tuple[str, str], RetryPolicy]) -> Work:
    work = aggregate.advance(now, "w", LEASE, policies)
    assert work is not None
    assert aggregate.record_outcome(work, Outcome(result=f"{work.name} done"), now, policies)
    return work


def names(aggregate: SagaAggregate) -> list[str]:
    return [type(event).__name__ for event in aggregate.pending_events]


def state(aggregate: SagaAggregate) -> SagaState:
    return aggregate.run.state


def test_all_steps_succeeding_completes_the_saga() -> None:
    """Three successes record StepStarted/StepSucceeded for each step in order, then SagaCompleted."""
    aggregate = start(Fulfil)
    for _ in range(3):
        succeed(aggregate, T0, FULFIL)
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert names(aggregate) == ["SagaStarted"] + ["StepStarted", "StepSucceeded"] * 3 + ["SagaCompleted"]
    assert state(aggregate) is SagaState.COMPLETED
    assert aggregate.run.results == {"reserve": "reserve done", "charge": "charge done", "ship": "ship done"}


def test_first_step_failing_for_good_leaves_nothing_to_undo() -> None:
    """A permanent failure of the first step ends compensated with no compensation run; later steps stay pending."""
    aggregate = start(Fulfil)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    assert aggregate.record_outcome(work, Outcome(error="NonRetryable: sold out", retryable=False), T0, FULFIL)
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.COMPENSATED
    states = [step.state for step in status_of(aggregate.run).steps]
    assert states == [StepState.FAILED, StepState.PENDING, StepState.PENDING]
    assert "CompensationStarted" not in names(aggregate)


def test_transient_failure_waits_for_the_policy_delay() -> None:
    """A retryable failure schedules the next attempt at now + delay(attempt), and not a moment earlier."""
    aggregate = start(Fulfil)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="flaky"), T0, FULFIL)
    retry_at = T0 + timedelta(seconds=fixed_policy(3).delay(1))
    assert aggregate.run.due_at == retry_at
    assert next_action(aggregate.run, retry_at - timedelta(microseconds=1)) == Sleep(retry_at)
    assert next_action(aggregate.run, retry_at) == Run("step", "reserve", 2)


def test_expired_lease_counts_as_an_attempt() -> None:
    """A worker that dies uses up its attempt: nothing happens before the lease ends, then attempt 2 is next."""
    aggregate = start(Fulfil)
    first = aggregate.advance(T0, "w1", LEASE, FULFIL)
    assert first == Work(aggregate.id, "step", "reserve", 1)
    expired = T0 + timedelta(seconds=LEASE)
    assert aggregate.advance(expired - SECOND, "w2", LEASE, FULFIL) is None  # still leased
    assert aggregate.advance(expired, "w2", LEASE, FULFIL) is None  # lost, retry scheduled
    assert aggregate.run.node("reserve").attempts == 1
    assert "lease expired" in (aggregate.run.node("reserve").last_error or "")
    second = aggregate.advance(aggregate.run.due_at or expired, "w2", LEASE, FULFIL)
    assert second == Work(aggregate.id, "step", "reserve", 2)


def test_expired_lease_on_the_last_attempt_fails_the_step() -> None:
    """A lost attempt that was the step's last fails the step for good and compensates."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    succeed(aggregate, T0, FULFIL)
    assert aggregate.advance(T0, "w1", LEASE, FULFIL) == Work(aggregate.id, "step", "ship", 1)
    work = aggregate.advance(T0 + timedelta(seconds=LEASE), "w2", LEASE, FULFIL)
    assert work == Work(aggregate.id, "compensation", "charge", 1)
    assert aggregate.run.node("ship").state is StepState.FAILED


def test_stale_outcome_is_dropped() -> None:
    """The outcome of an attempt whose lease expired and was retried is ignored and writes nothing."""
    aggregate = start(Fulfil)
    stale = aggregate.advance(T0, "w1", LEASE, FULFIL)
    assert stale is not None
    later = T0 + timedelta(seconds=LEASE + 60)
    assert aggregate.advance(later, "w2", LEASE, FULFIL) is None  # attempt 1 lost, attempt 2 due after a delay
    assert aggregate.run.due_at is not None
    later = aggregate.run.due_at
    fresh = aggregate.advance(later, "w2", LEASE, FULFIL)
    assert fresh is not None
    assert fresh.attempt == 2
    before = len(aggregate.pending_events)
    assert not aggregate.record_outcome(stale, Outcome(result="zombie"), later, FULFIL)
    assert not aggregate.renew(stale, later + timedelta(hours=1), later)
    assert len(aggregate.pending_events) == before
    assert aggregate.run.in_flight is not None
    assert aggregate.run.in_flight.attempt == 2


def test_renewed_lease_is_not_expired() -> None:
    """A renewed lease keeps the attempt alive past its first expiry."""
    aggregate = start(Fulfil)
    work = aggregate.advance(T0, "w1", LEASE, FULFIL)
    assert work is not None
    assert aggregate.renew(work, T0 + timedelta(seconds=3 * LEASE), T0 + SECOND)
    assert aggregate.advance(T0 + timedelta(seconds=2 * LEASE), "w2", LEASE, FULFIL) is None
    assert aggregate.run.in_flight is not None
    assert aggregate.record_outcome(work, Outcome(result="r"), T0 + timedelta(seconds=2 * LEASE), FULFIL)


def test_advance_without_claim_starts_nothing() -> None:
    """advance(claim=False), as a stopping worker calls it, records no StepStarted and returns no work."""
    aggregate = start(Fulfil)
    assert aggregate.advance(T0, "w", LEASE, FULFIL, claim=False) is None
    assert names(aggregate) == ["SagaStarted"]
    assert next_action(aggregate.run, T0) == Run("step", "reserve", 1)


def test_start_at_delays_the_first_step() -> None:
    """A saga started with start_at sleeps until then."""
    at = T0 + timedelta(minutes=5)
    aggregate = start(Fulfil, start_at=at)
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert next_action(aggregate.run, T0) == Sleep(at)
    assert aggregate.advance(at, "w", LEASE, FULFIL) == Work(aggregate.id, "step", "reserve", 1)


def test_compensations_run_in_reverse_and_end_compensated() -> None:
    """When the third step fails, charge then reserve are undone, each once, and the saga ends compensated."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="NonRetryable", retryable=False), T0, FULFIL)
    assert succeed(aggregate, T0, FULFIL).name == "charge"
    assert succeed(aggregate, T0, FULFIL).name == "reserve"
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.COMPENSATED
    states = [step.state for step in status_of(aggregate.run).steps]
    assert states == [StepState.COMPENSATED, StepState.COMPENSATED, StepState.FAILED]


def test_failed_compensation_fails_the_saga_and_retry_resumes() -> None:
    """A compensation failing for good ends the saga failed with the earlier undo not run; retry finishes it."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="NonRetryable", retryable=False), T0, FULFIL)
    refund = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert refund == Work(aggregate.id, "compensation", "charge", 1)
    aggregate.record_outcome(refund, Outcome(error="bank down"), T0, FULFIL)  # refund has one attempt
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.FAILED
    assert aggregate.run.error == "compensation of 'charge' failed: bank down"
    assert aggregate.run.node("reserve").state is StepState.SUCCEEDED  # not undone
    assert "CompensationStarted" in names(aggregate)
    assert [e.name for e in of_type(aggregate.pending_events, ev.CompensationStarted)] == ["charge"]
    aggregate.retry(T0 + SECOND)
    assert succeed(aggregate, T0 + SECOND, FULFIL) == Work(aggregate.id, "compensation", "charge", 2)
    assert succeed(aggregate, T0 + SECOND, FULFIL).name == "reserve"
    assert aggregate.advance(T0 + SECOND, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.COMPENSATED


def test_retry_gives_the_failed_compensation_a_fresh_budget() -> None:
    """After retry a compensation gets its full max_attempts again, its attempt numbers going on from before."""
    aggregate = start(Fulfil)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(), T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="NonRetryable", retryable=False), T0, FULFIL)
    now = T0
    for attempt in (1, 2):  # release has two attempts
        work = aggregate.advance(now, "w", LEASE, FULFIL)
        assert work == Work(aggregate.id, "compensation", "reserve", attempt)
        aggregate.record_outcome(work, Outcome(error="flaky"), now, FULFIL)
        now = aggregate.run.due_at or now
    assert aggregate.advance(now, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.FAILED
    aggregate.retry(now)
    work = aggregate.advance(now, "w", LEASE, FULFIL)
    assert work == Work(aggregate.id, "compensation", "reserve", 3)
    aggregate.record_outcome(work, Outcome(error="flaky"), now, FULFIL)
    assert of_type(aggregate.pending_events, ev.CompensationAttemptFailed)[-1].attempt == 3  # not failed for good
    assert aggregate.run.due_at is not None
    assert succeed(aggregate, aggregate.run.due_at, FULFIL) == Work(aggregate.id, "compensation", "reserve", 4)
    assert aggregate.advance(aggregate.run.due_at, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.COMPENSATED


def test_step_failing_after_cancel_is_not_retried() -> None:
    """A step in flight when the saga is cancelled fails for good on a retryable error; then the undo runs."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.cancel("no longer needed", T0)
    assert aggregate.record_outcome(work, Outcome(error="flaky"), T0, FULFIL)
    assert of_type(aggregate.pending_events, ev.StepFailed)
    assert not of_type(aggregate.pending_events, ev.StepAttemptFailed)
    assert succeed(aggregate, T0, FULFIL).name == "reserve"
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.CANCELLED


def test_step_succeeding_after_cancel_is_undone() -> None:
    """A step that succeeds while the cancel is pending is compensated too, and no later step starts."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.cancel(None, T0)
    assert aggregate.record_outcome(work, Outcome(), T0, FULFIL)
    assert [succeed(aggregate, T0, FULFIL).name for _ in range(2)] == ["charge", "reserve"]
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.CANCELLED
    assert aggregate.run.node("ship").state is StepState.PENDING


def test_wait_parks_the_saga_until_its_event() -> None:
    """A wait records WaitStarted, sleeps until its timeout, and the event lets the saga go on."""
    aggregate = start(Approved)
    succeed(aggregate, T0, APPROVED)
    assert aggregate.advance(T0, "w", LEASE, APPROVED) is None
    assert state(aggregate) is SagaState.WAITING
    assert aggregate.run.waiting_for == "approved"
    assert next_action(aggregate.run, T0) == Sleep(T0 + timedelta(seconds=60))
    assert aggregate.run.expects("approved")
    assert aggregate.run.expects("shipped")  # a later wait's event may come early
    aggregate.deliver("shipped", {"carrier": "x"}, T0 + SECOND)
    assert state(aggregate) is SagaState.WAITING
    aggregate.deliver("approved", {"by": "boss"}, T0 + SECOND)
    assert not aggregate.run.expects("approved")  # a repeat is unexpected
    assert succeed(aggregate, T0 + SECOND, APPROVED).name == "invoice"  # the early "shipped" was consumed
    assert aggregate.advance(T0 + SECOND, "w", LEASE, APPROVED) is None
    assert state(aggregate) is SagaState.COMPLETED
    assert aggregate.run.received == {"shipped": {"carrier": "x"}, "approved": {"by": "boss"}}


def test_wait_timeout_compensates_or_continues() -> None:
    """A timed-out compensating wait undoes the earlier steps; a timed-out 'continue' wait lets the saga go on."""
    aggregate = start(Approved)
    succeed(aggregate, T0, APPROVED)
    aggregate.advance(T0, "w", LEASE, APPROVED)
    later = T0 + timedelta(seconds=60)
    assert aggregate.advance(later, "w", LEASE, APPROVED) == Work(aggregate.id, "compensation", "reserve", 1)
    assert aggregate.run.node("approval").state is StepState.FAILED

    aggregate = start(Approved)
    succeed(aggregate, T0, APPROVED)
    aggregate.advance(T0, "w", LEASE, APPROVED)
    aggregate.deliver("approved", {}, T0)
    assert aggregate.advance(T0, "w", LEASE, APPROVED) is None
    assert aggregate.run.waiting_for == "shipped"
    assert aggregate.advance(later, "w", LEASE, APPROVED) == Work(aggregate.id, "step", "invoice", 1)
    assert aggregate.run.node("shipping").state is StepState.SUCCEEDED


def test_cancel_while_waiting_undoes_and_ends_cancelled() -> None:
    """Cancelling a waiting saga compensates what it did, resets the wait to pending and ends cancelled."""
    aggregate = start(Approved)
    succeed(aggregate, T0, APPROVED)
    aggregate.advance(T0, "w", LEASE, APPROVED)
    aggregate.cancel("changed my mind", T0 + SECOND)
    assert not aggregate.run.expects("approved")
    assert succeed(aggregate, T0 + SECOND, APPROVED).name == "reserve"
    assert aggregate.advance(T0 + SECOND, "w", LEASE, APPROVED) is None
    assert state(aggregate) is SagaState.CANCELLED
    assert aggregate.run.error == "cancelled: changed my mind"
    assert aggregate.run.node("approval").state is StepState.PENDING


def test_next_action_on_a_finished_saga_is_sleep_forever() -> None:
    """A terminal saga never has anything to do, whatever the time."""
    aggregate = start(Fulfil)
    aggregate.cancel(None, T0)
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.CANCELLED
    assert next_action(aggregate.run, T0 + timedelta(days=1)) == Sleep(None)


def test_start_wait_action_carries_the_timeout() -> None:
    """A wait without a timeout parks with no due time and wakes only for its event."""

    class Open(Saga[Order]):
        @step
        def go(self, order: Order) -> None:
            return None

        forever = wait_for("done")

    aggregate = start(Open)
    succeed(aggregate, T0, policies_of(Open))
    assert next_action(aggregate.run, T0) == StartWait("forever", "done", None)
    assert aggregate.advance(T0, "w", LEASE, policies_of(Open)) is None
    assert aggregate.run.due_at is None
    assert next_action(aggregate.run, T0 + timedelta(days=30)) == Sleep(None)
    aggregate.deliver("done", {}, T0 + timedelta(days=30))
    assert next_action(aggregate.run, T0 + timedelta(days=30)) == Finish(SagaState.COMPLETED)


# Regressions: bugs these tests found in the core (fixed since in the working tree)


def test_early_event_for_a_leading_wait_is_consumed() -> None:
    """An event sent before the saga reaches its first node, a wait, lets the saga pass that wait."""

    class WaitFirst(Saga[Order]):
        approval = wait_for("approved", timeout=60)

        @step
        def go(self, order: Order) -> None:
            return None

    policies = policies_of(WaitFirst)
    aggregate = start(WaitFirst)
    assert aggregate.run.expects("approved")
    aggregate.deliver("approved", {"by": "boss"}, T0)
    assert aggregate.advance(T0, "w", LEASE, policies) == Work(aggregate.id, "step", "go", 1)


def test_no_step_is_left_running_in_a_cancelled_saga() -> None:
    """A step cancelled between two attempts is not shown as running once the saga has ended."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="flaky"), T0, FULFIL)  # charge waits for attempt 2
    aggregate.cancel(None, T0)
    assert succeed(aggregate, T0, FULFIL).name == "reserve"
    assert aggregate.advance(T0, "w", LEASE, FULFIL) is None
    assert state(aggregate) is SagaState.CANCELLED
    assert aggregate.run.node("charge").state is not StepState.RUNNING


def test_outcome_from_before_a_retry_is_dropped() -> None:
    """A compensation attempt lost before the saga failed cannot record its outcome for the attempt after retry."""
    aggregate = start(Fulfil)
    succeed(aggregate, T0, FULFIL)
    succeed(aggregate, T0, FULFIL)
    work = aggregate.advance(T0, "w", LEASE, FULFIL)
    assert work is not None
    aggregate.record_outcome(work, Outcome(error="NonRetryable", retryable=False), T0, FULFIL)
    hung = aggregate.advance(T0, "w1", LEASE, FULFIL)  # refund, attempt 1; its worker hangs
    assert hung is not None
    later = T0 + timedelta(seconds=LEASE)
    assert aggregate.advance(later, "w2", LEASE, FULFIL) is None  # lost; refund has one attempt: failed
    assert state(aggregate) is SagaState.FAILED
    aggregate.retry(later)
    fresh = aggregate.advance(later, "w2", LEASE, FULFIL)
    assert fresh is not None
    assert not aggregate.record_outcome(hung, Outcome(), later, FULFIL)


def test_stored_events_carry_the_contract_names() -> None:
    """The event classes a history shows have the names DESIGN.md makes part of the contract."""
    contract = {"SagaStarted", "StepStarted", "StepSucceeded", "StepAttemptFailed", "StepFailed", "EventReceived"}
    contract |= {"WaitTimedOut", "CompensationStarted", "CompensationSucceeded", "CompensationAttemptFailed"}
    contract |= {"SagaCompleted", "SagaCompensated", "SagaCancelled", "SagaFailed"}
    assert contract <= {name for name in dir(ev) if isinstance(getattr(ev, name), type)}
    assert all(getattr(ev, name).topic == f"sagaworks.{name}.v1" for name in contract)


def test_generated_sagas_match_their_plan() -> None:
    """build_saga makes the steps, waits and compensations its specs describe (the property tests rely on it)."""
    saga = build_saga([StepSpec(2, 3), WaitSpec(5.0, "continue"), StepSpec(1, None)])
    assert [type(node) for node in saga.nodes] == [StepDef, WaitDef, StepDef]
    first, last = saga.steps()
    assert first.retry.max_attempts == 2
    assert first.compensation is not None
    assert first.compensation.retry.max_attempts == 3
    assert last.compensation is None
    assert saga.waits()["e1"].on_timeout == "continue"
