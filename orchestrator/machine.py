"""The pure core: a saga's state folded from its events, and what should happen next.

Nothing here does I/O or reads the clock: ``now`` and every timestamp come in as arguments,
so replaying a history always folds to the same ``SagaRun`` and the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.states import SagaState, StepState

Kind = Literal["step", "compensation"]


class PlanNode(BaseModel):
    """The shape of one step or wait, recorded in ``SagaStarted`` so the history stands alone."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["step", "wait"] = "step"
    max_attempts: int = 1
    compensable: bool = False
    compensation_max_attempts: int = 1
    event: str | None = None
    timeout: float | None = None
    on_timeout: Literal["compensate", "continue"] = "compensate"


@dataclass
class NodeRun:
    """How far one node of the plan has got."""

    plan: PlanNode
    state: StepState = StepState.PENDING
    attempts: int = 0
    last_error: str | None = None
    compensation_attempts: int = 0
    compensation_failed: bool = False
    compensation_base: int = 0
    """Attempts made before the last ``retry``; attempt numbers keep counting, budgets restart."""


@dataclass
class InFlight:
    """An attempt that a worker has claimed and whose outcome is not recorded yet."""

    kind: Kind
    name: str
    attempt: int
    lease_until: datetime
    worker: str


@dataclass
class SagaRun:
    """A saga's state: the fold of its events."""

    saga_id: str
    saga: str
    input: dict[str, Any]
    nodes: list[NodeRun]
    created_at: datetime
    updated_at: datetime
    version: int = 1
    state: SagaState = SagaState.PENDING
    cursor: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    received: dict[str, Any] = field(default_factory=dict)
    in_flight: InFlight | None = None
    due_at: datetime | None = None
    waiting_for: str | None = None
    wait_until: datetime | None = None
    compensating: bool = False
    cancel_requested: bool = False
    error: str | None = None
    cause: str | None = None
    """Why the saga turned back (kept when a retried compensation clears ``error``)."""
    search: dict[str, Any] = field(default_factory=dict)
    """Searchable input fields and their values, as recorded at start."""
    notify: str | None = None
    """Where to POST the final status, if the starter asked."""
    pool: str | None = None
    """The pool whose limits this saga runs under (its saga's name, or a trigger's), if any."""
    pool_key: str = ""
    """Its key within the pool (from the limits' ``per``)."""
    queued: str | None = None
    """Why it waits to be admitted (``None``: it is not queued)."""
    admitted: bool = False
    """Whether its pool let it in (it holds a slot until it ends)."""
    queue_reason: str | None = None
    """The reason it waits whenever it is queued (at start, and again when a failed saga is resumed)."""

    def requeue(self) -> None:
        """A failed saga that runs again (retried, or a compensation resolved) waits for a slot again:
        it gave its slot up when it ended ``failed``."""
        if self.pool is not None:
            self.queued, self.admitted = self.queue_reason, False

    by_name: dict[str, NodeRun] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.by_name = {node.plan.name: node for node in self.nodes}

    def node(self, name: str) -> NodeRun:
        """The node called ``name`` (``KeyError`` if the plan has none)."""
        return self.by_name[name]

    def pass_received_waits(self) -> None:
        """Move the cursor past waits whose event arrived early."""
        while self.cursor < len(self.nodes):
            node = self.nodes[self.cursor]
            if node.plan.kind != "wait" or node.plan.event not in self.received:
                return
            node.state = StepState.SUCCEEDED
            self.cursor += 1

    def start_compensating(self, at: datetime) -> None:
        """Turn back: from now on only compensations run."""
        self.cause = self.error
        self.compensating = True
        self.waiting_for = self.wait_until = None
        self.state = SagaState.COMPENSATING
        if self.in_flight is None:
            self.due_at = at

    def next_compensation(self) -> NodeRun | None:
        """The next step to undo: the last succeeded step that has a compensation."""
        for node in reversed(self.nodes):
            if node.plan.compensable and node.state is StepState.SUCCEEDED:
                return node
        return None

    def expects(self, event: str) -> bool:
        """Whether ``send(event)`` is welcome: a wait for it lies ahead and it has not come yet."""
        if self.state.terminal or self.compensating or event in self.received:
            return False
        return any(node.plan.event == event for node in self.nodes[self.cursor :])

    def refusal(self, event: str) -> str | None:
        """Why ``send(event)`` is not welcome now (``None``: it is), to follow "saga <id> ..."."""
        if self.expects(event):
            return None
        if self.state.terminal:
            return f"is {self.state.value}: it takes no more events"
        if event in self.received:
            return f"already received {event!r}"
        if self.compensating:
            return f"is compensating: it no longer waits for {event!r}"
        waits = [node.plan.event for node in self.nodes[self.cursor :] if node.plan.event]
        return f"does not wait for {event!r} (it still waits for: {', '.join(waits) or 'nothing'})"

    def current_step(self) -> str | None:
        """The node in progress or next in line, if any."""
        if self.in_flight is not None:
            return self.in_flight.name
        if self.state.terminal:
            return None
        if self.compensating:
            node = self.next_compensation()
            return node.plan.name if node else None
        return self.nodes[self.cursor].plan.name if self.cursor < len(self.nodes) else None


# The actions a worker obeys.


@dataclass(frozen=True)
class Sleep:
    """Nothing to do before ``until`` (``None``: until an event or an operator acts)."""

    until: datetime | None


@dataclass(frozen=True)
class Run:
    """Start attempt ``attempt`` of a step or a compensation."""

    kind: Kind
    name: str
    attempt: int


@dataclass(frozen=True)
class StartWait:
    """Park the saga on a wait, timing out at ``until``."""

    name: str
    event: str
    until: datetime | None


@dataclass(frozen=True)
class TimeOut:
    """The wait's timeout has passed without its event."""

    name: str
    event: str


@dataclass(frozen=True)
class LeaseExpired:
    """The worker that claimed this attempt died or hung: the attempt counts as failed."""

    kind: Kind
    name: str
    attempt: int


@dataclass(frozen=True)
class Finish:
    """Record the terminal state."""

    state: SagaState


Action = Sleep | Run | StartWait | TimeOut | LeaseExpired | Finish


def next_action(run: SagaRun, now: datetime) -> Action:
    """Decide what happens next to the saga, from its state and the time alone."""
    if run.state.terminal:
        return Sleep(None)
    if run.in_flight is not None:
        flight = run.in_flight
        if now < flight.lease_until:
            return Sleep(flight.lease_until)
        return LeaseExpired(flight.kind, flight.name, flight.attempt)
    if run.due_at is None or now < run.due_at:
        return Sleep(run.due_at)
    if run.compensating:
        target = run.next_compensation()
        if target is None:
            return Finish(SagaState.CANCELLED if run.cancel_requested else SagaState.COMPENSATED)
        if target.compensation_failed:
            return Finish(SagaState.FAILED)
        return Run("compensation", target.plan.name, target.compensation_attempts + 1)
    if run.cursor >= len(run.nodes):
        return Finish(SagaState.COMPLETED)
    node = run.nodes[run.cursor]
    if node.plan.kind == "wait":
        assert node.plan.event is not None
        if run.waiting_for is None:
            until = None if node.plan.timeout is None else now + timedelta(seconds=node.plan.timeout)
            return StartWait(node.plan.name, node.plan.event, until)
        return TimeOut(node.plan.name, node.plan.event)
    return Run("step", node.plan.name, node.attempts + 1)
