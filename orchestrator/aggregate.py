"""The saga aggregate: commands that check, decide and record events on one saga."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.domain import BaseAggregate
from eventsourcing.utils import register_topic
from pydantic import BaseModel

from orchestrator import events as ev
from orchestrator.definition import Saga
from orchestrator.errors import InvalidInput
from orchestrator.events.base import created
from orchestrator.limits import Limits
from orchestrator.machine import (
    Finish,
    LeaseExpired,
    Run,
    SagaRun,
    Sleep,
    StartWait,
    TimeOut,
    next_action,
)
from orchestrator.registry import plan_of, search_values, validate_input
from orchestrator.retry import RetryPolicy
from orchestrator.safety import check_saga_id, check_url, one_line, short
from orchestrator.states import SagaState

TOPIC = "sagaworks.Saga"
JITTER = random.Random()
"""Draws the jitter of retry delays (seeding a generator per decision costs more than the decision)."""


@functools.lru_cache(maxsize=16_384)
def aggregate_id(saga_id: str) -> UUID:
    """The aggregate id of a saga id: deterministic, so a repeated start collides. Cached: every
    status read and command computes it, polls of one saga again and again (a SHA-1 each)."""
    return uuid5(NAMESPACE_URL, f"sagaworks:saga:{saga_id}")


@dataclass(frozen=True)
class Outcome:
    """What an attempt ended with: a result, or an error and whether it is retryable."""

    result: Any = None
    error: str | None = None
    retryable: bool = True
    emitted: list[dict[str, Any]] = field(default_factory=list)
    traceback: str | None = None
    """The formatted traceback of an unexpected exception, as recorded in the history."""
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    """The unexpected exception itself, for the worker's log (never stored)."""


@dataclass(frozen=True)
class Work:
    """An attempt claimed by a worker: run it, then record its outcome."""

    saga_uuid: UUID
    kind: str
    name: str
    attempt: int


class SagaAggregate(BaseAggregate[UUID]):
    """One saga instance; its state is ``run``, the fold of its events."""

    run: SagaRun
    _input: Any = None

    def input_model(self, saga: type[Saga[Any]]) -> Any:
        """The saga's input, validated by its model once per loaded aggregate."""
        if self._input is None:
            self._input = saga.input_model.model_validate(self.run.input)
        return self._input

    @classmethod
    def start(
        cls,
        saga: type[Saga[Any]],
        saga_id: str,
        input: dict[str, Any],
        now: datetime,
        start_at: datetime | None,
        notify: str | None = None,
        queue: tuple[str, str, str] | None = None,
    ) -> SagaAggregate:
        """A new saga, with its ``SagaStarted`` pending; with ``queue`` (pool, key, reason) it is queued."""
        pool_name, pool_key, queued = queue or (None, "", None)
        event = ev.SagaStarted(
            originator_id=aggregate_id(saga_id),
            originator_version=cls.INITIAL_VERSION,
            timestamp=now,
            originator_topic=TOPIC,
            saga_id=saga_id,
            saga=saga.name,
            input=input,
            plan=plan_of(saga),
            start_at=start_at,
            search=search_values(saga, input),
            notify=notify,
            pool=pool_name,
            pool_key=pool_key,
            queued=queued,
        )
        return created(event, cls)

    @classmethod
    def begin(
        cls,
        saga: type[Saga[Any]],
        data: BaseModel | dict[str, Any],
        saga_id: str | None,
        start_at: datetime | None,
        max_bytes: int,
        notify: str | None = None,
        pool: tuple[str, Limits] | None = None,
    ) -> SagaAggregate:
        """A new saga of a registered class, its ``SagaStarted`` pending, once its input and id pass.

        It runs under ``pool``'s limits (a trigger's), else under its class's ``limits``, if any."""
        saga_id = uuid4().hex if saga_id is None else check_saga_id(saga_id)
        payload = validate_input(saga, data, max_bytes)
        if start_at is not None and (not isinstance(start_at, datetime) or start_at.utcoffset() is None):
            raise InvalidInput(f"start_at must be a timezone-aware datetime, not {short(start_at)}")
        url = None if notify is None else check_url(notify)
        if pool is None and saga.limits is not None:
            pool = (saga.name, saga.limits)
        queue = None
        if pool is not None:
            name, limits = pool
            try:
                key = limits.key(saga.input_model.model_validate(payload))
            except Exception as error:  # the user's per= function
                raise InvalidInput(f"the limits of {saga.name} cannot key this input: {one_line(error)}") from None
            queue = (name, key, limits.reason(key))
        return cls.start(saga, saga_id, payload, datetime.now(UTC), start_at, url, queue)

    def __init__(self) -> None:
        """Aggregates are made by ``start`` or replay, never directly."""

    def _record(self, event_class: type[ev.SagaEvent], now: datetime, **data: Any) -> None:
        # The engine builds its own events from values it already holds, typed: skip validation
        # (the mapper validates everything read back from storage).
        event = event_class.model_construct(
            originator_id=self.id, originator_version=self.version + 1, timestamp=now, **data
        )
        event.mutate(self)
        self.pending_events.append(event)

    def advance(
        self,
        now: datetime,
        worker: str,
        lease: float,
        policies: dict[tuple[str, str], RetryPolicy],
        *,
        claim: bool = True,
    ) -> Work | None:
        """Record every decision due by ``now``; return the attempt to run, if one is claimed.

        With ``claim=False`` (a worker shutting down) no new attempt is started.
        """
        rand = JITTER
        for _ in range(4 * len(self.run.nodes) + 8):
            action = next_action(self.run, now)
            if isinstance(action, Sleep):
                return None
            if isinstance(action, Run):
                if not claim:
                    return None
                started = ev.StepStarted if action.kind == "step" else ev.CompensationStarted
                lease_until = now + timedelta(seconds=lease)
                self._record(
                    started, now, name=action.name, attempt=action.attempt, lease_until=lease_until, worker=worker
                )
                return Work(self.id, action.kind, action.name, action.attempt)
            if isinstance(action, StartWait):
                self._record(ev.WaitStarted, now, name=action.name, event=action.event, timeout_at=action.until)
            elif isinstance(action, TimeOut):
                on_timeout = self.run.node(action.name).plan.on_timeout
                self._record(ev.WaitTimedOut, now, name=action.name, event=action.event, on_timeout=on_timeout)
            elif isinstance(action, LeaseExpired):
                error = f"attempt {action.attempt} lost: its worker died or hung (lease expired)"
                self._fail(action.kind, action.name, action.attempt, error, True, now, policies, rand)
            elif isinstance(action, Finish):
                if action.state is SagaState.FAILED:
                    self._record(ev.SagaFailed, now, error=self.run.error or "a compensation failed")
                else:
                    self._record(ev.TERMINAL_EVENTS[action.state], now)
        raise AssertionError(f"saga {self.run.saga_id} did not settle")  # pragma: no cover

    def record_outcome(
        self, work: Work, outcome: Outcome, now: datetime, policies: dict[tuple[str, str], RetryPolicy]
    ) -> bool:
        """Record the outcome of ``work`` if it is still the attempt in flight; else drop it."""
        if not self.holds(work):
            return False
        if outcome.error is None:
            if work.kind == "step":
                for emitted in outcome.emitted:
                    self._record(
                        ev.DomainEventEmitted,
                        now,
                        name=work.name,
                        attempt=work.attempt,
                        event=emitted["name"],
                        data=emitted["data"],
                    )
                self._record(ev.StepSucceeded, now, name=work.name, attempt=work.attempt, result=outcome.result)
            else:
                self._record(ev.CompensationSucceeded, now, name=work.name, attempt=work.attempt)
        else:
            self._fail(
                work.kind,
                work.name,
                work.attempt,
                outcome.error,
                outcome.retryable,
                now,
                policies,
                JITTER,
                outcome.traceback,
            )
        return True

    def _fail(
        self,
        kind: str,
        name: str,
        attempt: int,
        error: str,
        retryable: bool,
        now: datetime,
        policies: dict[tuple[str, str], RetryPolicy],
        rand: random.Random,
        traceback: str | None = None,
    ) -> None:
        node = self.run.node(name)
        failed: type[ev.SagaEvent]
        again: type[ev.SagaEvent]
        if kind == "step":
            # A step that fails while the saga is already turning back is not retried.
            final = not retryable or attempt >= node.plan.max_attempts or self.run.compensating
            failed, again = ev.StepFailed, ev.StepAttemptFailed
        else:
            final = not retryable or attempt - node.compensation_base >= node.plan.compensation_max_attempts
            failed, again = ev.CompensationFailed, ev.CompensationAttemptFailed
        if final:
            self._record(failed, now, name=name, attempt=attempt, error=error, traceback=traceback)
        else:
            retry_at = now + timedelta(seconds=policies[(kind, name)].delay(attempt, rand))
            self._record(again, now, name=name, attempt=attempt, error=error, retry_at=retry_at, traceback=traceback)

    def holds(self, work: Work) -> bool:
        """Whether ``work`` is still the attempt in flight (not timed out, lost or superseded)."""
        flight = self.run.in_flight
        return flight is not None and (flight.kind, flight.name, flight.attempt) == (work.kind, work.name, work.attempt)

    def renew(self, work: Work, lease_until: datetime, now: datetime) -> bool:
        """Extend the lease of ``work`` if it is still the attempt in flight."""
        if not self.holds(work):
            return False
        self._record(ev.LeaseRenewed, now, name=work.name, attempt=work.attempt, lease_until=lease_until)
        return True

    def deliver(self, event: str, data: dict[str, Any], now: datetime) -> None:
        """Record an event sent to the saga (the caller checked ``run.expects``)."""
        self._record(ev.EventReceived, now, event=event, data=data)

    def admit(self, now: datetime) -> None:
        """Let a queued saga in (the admission pass checked its pool has room)."""
        self._record(ev.SagaAdmitted, now)

    def cancel(self, reason: str | None, now: datetime) -> None:
        """Record a cancellation (the caller checked the saga is not finished)."""
        self._record(ev.CancelRequested, now, reason=reason)

    def retry(self, now: datetime) -> None:
        """Resume a failed saga (the caller checked it is ``failed``)."""
        self._record(ev.SagaRetried, now)

    def terminate(self, reason: str | None, now: datetime) -> None:
        """End the saga where it stands, compensating nothing (the caller checked it may end)."""
        self._record(ev.SagaTerminated, now, reason=reason)

    def resolve(self, step: str, reason: str | None, now: datetime) -> None:
        """Mark a failed compensation as done by hand (the caller checked it failed)."""
        self._record(ev.CompensationResolved, now, name=step, reason=reason)


register_topic(TOPIC, SagaAggregate)
