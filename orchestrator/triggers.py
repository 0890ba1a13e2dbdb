"""Event triggers: a saga declares the domain events that start it, with a condition and a mapping
from the event to its input::

    class ExpenseApproval(Saga[Claim]):
        triggers = [on(ClaimSubmitted, when=lambda e: e.amount > 500,
                       input=lambda e: Claim(id=e.claim_id, employee=e.employee, amount=e.amount))]

The trigger processor follows the log (the library's tracking records): for each batch of domain
events it starts the sagas they trigger and records the batch's position and what it decided for
each event (started, or skipped and why) in ONE transaction, so an event starts exactly one saga,
also after a crash, whatever the number of workers. The saga's id comes from the trigger and the
event, so even an event recorded twice cannot start two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from eventsourcing.persistence import Tracking
from pydantic import ValidationError

from orchestrator import events as ev
from orchestrator.aggregate import SagaAggregate
from orchestrator.domain import DomainEventRecorded, SagaEnded, Trigger
from orchestrator.following import BATCH, Change
from orchestrator.limits import Limits
from orchestrator.readmodels.status import index_entry
from orchestrator.safety import clean_error, derived_id, one_line
from orchestrator.storage import SagaIndex

if TYPE_CHECKING:
    from orchestrator.definition import Saga
    from orchestrator.registry import Registry
    from orchestrator.repository import Repository

DECISIONS = "triggers"
"""The projection rows that say, per domain event, what each trigger did with it."""
ENDS = {
    "SagaCompleted": "completed",
    "SagaCompensated": "compensated",
    "SagaCancelled": "cancelled",
    "SagaFailed": "failed",
}


class TriggerProcessor:
    """Follows the log's domain events (and sagas' ends) and starts the sagas they trigger (a ``Follower``)."""

    name: ClassVar[str] = "triggers"

    def __init__(self, registry: Registry, repository: Repository, max_bytes: int) -> None:
        self.registry = registry
        self.repository = repository
        self.max_bytes = max_bytes

    @property
    def events(self) -> list[str]:
        """Domain events; and sagas' ends only while some trigger starts a saga on one (chaining):
        otherwise every saga's end would be read, with its history, for nothing."""
        wanted = ["DomainEventRecorded", "DomainEventEmitted"]
        return [*wanted, *ENDS] if SagaEnded.event_name in self.triggers() else wanted

    def triggers(self) -> dict[str, list[tuple[type[Saga[Any]], Trigger]]]:
        """Event name -> the sagas it starts, with their triggers."""
        found: dict[str, list[tuple[type[Saga[Any]], Trigger]]] = {}
        for saga in self.registry:
            for trigger in saga.triggers:
                if isinstance(trigger, Trigger):  # not on_change(...): the upstreams' processors do those
                    found.setdefault(trigger.event.event_name, []).append((saga, trigger))
        return found

    def record(self, changes: list[Change], tracking: Tracking, index: SagaIndex) -> None:
        by_event = self.triggers()
        starts: dict[str, SagaAggregate] = {}
        decisions: dict[str, list[dict[str, Any]]] = {}
        for change in changes:
            found = domain_event(change)
            if found is None:
                continue
            event_id, name, data = found
            for saga, trigger in by_event.get(name, []):
                decision, aggregate = self._decide(saga, trigger, event_id, name, data)
                decisions.setdefault(event_id, []).append(decision)
                if aggregate is not None:
                    starts.setdefault(aggregate.run.saga_id, aggregate)
        self._write(list(starts.values()), decisions, tracking, index)

    def _decide(
        self, saga: type[Saga[Any]], trigger: Trigger, event_id: str, name: str, data: dict[str, Any]
    ) -> tuple[dict[str, Any], SagaAggregate | None]:
        label = trigger.named(saga.name)
        try:
            event = trigger.event.model_validate(data)
        except ValidationError as error:
            return {"trigger": label, "skipped": skip_reason(error)}, None
        saga_id = derived_id(label, event_id)
        pool = None if trigger.limits is None else (label, trigger.limits)
        return decide(saga, label, saga_id, event, trigger.when, trigger.input, data, self.max_bytes, pool)

    def _write(
        self,
        starts: list[SagaAggregate],
        decisions: dict[str, list[dict[str, Any]]],
        tracking: Tracking,
        index: SagaIndex,
    ) -> None:
        record_starts(
            self.repository, starts, [(DECISIONS, key, orjson.dumps(d)) for key, d in decisions.items()], tracking
        )

    def reset(self, index: SagaIndex) -> None:
        from orchestrator.following import tracking_name

        index.reset_follower(tracking_name(self.name), DECISIONS)


class Triggering:
    """The side task workers run: start the sagas that new domain events trigger (when any saga has triggers)."""

    name = "triggers"
    on_wake = True
    """New events may be domain events: look at them soon, not after the idle pause."""

    def __init__(self, processor: TriggerProcessor, log: Any) -> None:
        self.processor = processor
        self.log = log

    def run(self) -> float | None:
        if not self.processor.triggers():
            return 5.0
        # Again at once only after a full batch (a backlog); otherwise new events bring the next look
        # forward (on_wake, at most every WAKE_GAP): every worker round would pay the follower's four
        # round trips between two steps of every saga it holds.
        return 0.0 if self.log.catch_up(self.processor) >= BATCH else 0.5


def decide(
    saga: type[Saga[Any]],
    label: str,
    saga_id: str,
    event: Any,
    when: Callable[[Any], bool] | None,
    mapping: Callable[[Any], Any] | None,
    default: dict[str, Any],
    max_bytes: int,
    pool: tuple[str, Limits] | None = None,
) -> tuple[dict[str, Any], SagaAggregate | None]:
    """What a trigger does with one event: start ``saga`` (its input ``mapping(event)``, else ``default``)
    unless ``when(event)`` is false; a condition or mapping that raises, or bad input, skips it visibly."""
    try:
        if when is not None and not when(event):
            return {"trigger": label, "skipped": "condition is false"}, None
        given = mapping(event) if mapping is not None else default
        aggregate = SagaAggregate.begin(saga, given, saga_id, None, max_bytes, pool=pool)
    except Exception as error:  # a user's condition or mapping, or input the saga refuses
        return {"trigger": label, "skipped": skip_reason(error)}, None
    return {"trigger": label, "started": aggregate.run.saga_id}, aggregate


def skip_reason(error: BaseException) -> str:
    """Why an event started nothing, on one line (the exception's type and message)."""
    return clean_error(f"{type(error).__name__}: {one_line(error)}"[:500])


def record_starts(
    repository: Repository, starts: list[SagaAggregate], rows: list[tuple[str, str, bytes | None]], tracking: Tracking
) -> None:
    """Start ``starts`` and write the decision ``rows`` with the follower's new position, in one transaction.

    A saga whose id exists already (started by hand, or by an earlier run of this very batch whose
    acknowledgement was lost) is not started again. ``IntegrityError``: someone else recorded this
    batch (or took a saga id meanwhile); nothing was written, read again.
    """
    if starts:
        existing, broken = repository.load_many([a.id for a in starts])  # an unloadable one exists too
        starts = [a for a in starts if a.id not in existing and a.id not in broken]
    if not starts:
        by_projection: dict[str, dict[str, bytes | None]] = {}
        for projection, key, doc in rows:
            by_projection.setdefault(projection, {})[key] = doc
        if not by_projection:
            by_projection[DECISIONS] = {}
        for projection, found in by_projection.items():
            repository.index.write_rows(projection, found, tracking)
        return
    events = [event for aggregate in starts for event in aggregate.collect_events()]
    entries = [index_entry(aggregate) for aggregate in starts]
    repository.store.events.put(events, tracking=tracking, index=entries, rows=rows)
    repository.wake_workers()


def domain_event(change: Change) -> tuple[str, str, dict[str, Any]] | None:
    """(event id, name, data) of a change that is a domain event: one emitted, or a saga's end."""
    event = change.event
    if isinstance(event, DomainEventRecorded):
        return event.event_id, event.name, event.data
    if isinstance(event, ev.DomainEventEmitted):
        return f"{event.originator_id}:{event.originator_version}", event.event, event.data
    state = ENDS.get(type(event).__name__)
    if state is None:
        return None
    run = change.run
    ended = SagaEnded(saga=run.saga, saga_id=run.saga_id, state=state, result=run.results, error=run.error)
    return f"{event.originator_id}:{event.originator_version}", SagaEnded.event_name, ended.model_dump(mode="json")
