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

from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from eventsourcing.persistence import IntegrityError, Tracking
from pydantic import ValidationError

from orchestrator import events as ev
from orchestrator.aggregate import SagaAggregate
from orchestrator.domain import DomainEventRecorded, SagaEnded, Trigger
from orchestrator.errors import OrchestratorError
from orchestrator.following import Change
from orchestrator.readmodels.status import index_entry
from orchestrator.safety import clean_error
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
    events: ClassVar[list[str]] = ["DomainEventRecorded", "DomainEventEmitted", *ENDS]

    def __init__(self, registry: Registry, repository: Repository, max_bytes: int) -> None:
        self.registry = registry
        self.repository = repository
        self.max_bytes = max_bytes

    def triggers(self) -> dict[str, list[tuple[type[Saga[Any]], Trigger]]]:
        """Event name -> the sagas it starts, with their triggers."""
        found: dict[str, list[tuple[type[Saga[Any]], Trigger]]] = {}
        for saga in self.registry:
            for trigger in saga.triggers:
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
            if trigger.when is not None and not trigger.when(event):
                return {"trigger": label, "skipped": "condition is false"}, None
            given = trigger.input(event) if trigger.input is not None else data
            saga_id = f"{label}:{event_id}"[:200]
            aggregate = SagaAggregate.begin(saga, given, saga_id, None, self.max_bytes)
        except (ValidationError, OrchestratorError, Exception) as error:  # a user's condition or mapping
            reason = clean_error(f"{type(error).__name__}: {' '.join(str(error).split())}"[:500])
            return {"trigger": label, "skipped": reason}, None
        return {"trigger": label, "started": aggregate.run.saga_id}, aggregate

    def _write(
        self,
        starts: list[SagaAggregate],
        decisions: dict[str, list[dict[str, Any]]],
        tracking: Tracking,
        index: SagaIndex,
    ) -> None:
        rows = [(DECISIONS, event_id, orjson.dumps(d)) for event_id, d in decisions.items()]
        if starts:
            # A saga of that id exists already (started by hand, or by an earlier run of this very
            # batch whose acknowledgement was lost): it is not started again.
            existing, _ = self.repository.load_many([a.id for a in starts])
            starts = [a for a in starts if a.id not in existing]
        if not starts:
            index.write_rows(DECISIONS, {key: doc for _, key, doc in rows}, tracking)
            return
        events = [event for aggregate in starts for event in aggregate.collect_events()]
        entries = [index_entry(aggregate) for aggregate in starts]
        try:
            self.repository.store.events.put(events, tracking=tracking, index=entries, rows=rows)
        except IntegrityError:
            raise  # the batch was recorded by someone else (or a saga id was taken meanwhile): read again
        self.repository.wake_workers()

    def reset(self, index: SagaIndex) -> None:
        from orchestrator.following import tracking_name

        index.reset_follower(tracking_name(self.name), DECISIONS)


class Triggering:
    """The side task workers run: start the sagas that new domain events trigger (when any saga has triggers)."""

    name = "triggers"

    def __init__(self, processor: TriggerProcessor, log: Any) -> None:
        self.processor = processor
        self.log = log

    def run(self) -> float | None:
        if not self.processor.triggers():
            return 5.0
        return 0.0 if self.log.catch_up(self.processor) else 0.5


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
