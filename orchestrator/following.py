"""Following the saga event log exactly once: read models, notifications and triggers that are
kept from the histories after the fact.

A follower reads the notifications after its tracked position (the library's tracking record,
a high-water mark per follower), and writes what they mean together with the new position in
one transaction; a crash between two batches repeats nothing, and two processes following at
once cannot both record the same batch (the second tracking record is refused and its writes
roll back with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.persistence import ApplicationRecorder, IntegrityError, Notification, StoredEvent, Tracking

from orchestrator import events as ev
from orchestrator.domain import DomainEventRecorded
from orchestrator.machine import SagaRun
from orchestrator.repository import Repository
from orchestrator.storage import APPLICATION_NAME, SagaIndex

BATCH = 500
"""Notifications read (and recorded) per transaction."""
SAGA_TOPICS: dict[str, str] = {
    name: cls.topic
    for name in ev.__all__
    if isinstance(cls := getattr(ev, name), type) and issubclass(cls, ev.SagaEvent) and cls.topic
}
"""Saga event type name -> stored topic."""
TOPICS: dict[str, str] = {**SAGA_TOPICS, "DomainEventRecorded": DomainEventRecorded.topic}
"""Every event type in the log by name -> stored topic, for filtering the log in the database."""


def tracking_name(follower: str) -> str:
    """The name a follower's position is tracked under (one row per follower in the tracking table)."""
    return f"{follower}@{APPLICATION_NAME}"


class Histories:
    """The histories of the sagas in one batch of the log, read when a follower first asks: all of
    them in one query, or, for a follower that needs only how each saga started, each one's first
    event (most sagas have no notify URL, and their start says so)."""

    def __init__(self, index: SagaIndex, saga_uuids: list[UUID]) -> None:
        self.index = index
        self.saga_uuids = saga_uuids
        self.full: dict[UUID, list[StoredEvent]] | None = None
        self.firsts: dict[UUID, StoredEvent] | None = None

    def of(self, saga_uuid: UUID) -> Sequence[StoredEvent]:
        """The saga's whole history (the batch's histories are read on the first call)."""
        if self.full is None:
            self.full = {}
            for record in self.index.select_events_many(self.saga_uuids):
                self.full.setdefault(_uuid(record.originator_id), []).append(record)
        return self.full.get(saga_uuid, [])

    def first(self, saga_uuid: UUID) -> StoredEvent | None:
        """The saga's first event (the batch's first events are read on the first call)."""
        if self.full is not None:
            history = self.full.get(saga_uuid)
            return history[0] if history else None
        if self.firsts is None:
            firsts = self.index.select_events_many(self.saga_uuids, first_only=True)
            self.firsts = {_uuid(record.originator_id): record for record in firsts}
        return self.firsts.get(saga_uuid)


def _uuid(value: Any) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


@dataclass
class Change:
    """One event of the log, as a follower sees it: the event, and the saga as it stood right after."""

    position: int
    """The event's notification id: its place in the log."""
    event: ev.SagaEvent
    histories: Histories = field(repr=False)
    mapper: Any = field(repr=False)

    @property
    def history(self) -> Sequence[StoredEvent]:
        """The saga's stored events (its whole history, read for the batch on first use)."""
        return self.histories.of(self.saga_uuid)

    @property
    def type(self) -> str:
        """The event's type name, e.g. ``SagaCompleted``."""
        return type(self.event).__name__

    @property
    def saga_uuid(self) -> UUID:
        """The saga's aggregate id."""
        return self.event.originator_id

    @cached_property
    def started(self) -> ev.SagaStarted | None:
        """The saga's first event (its start: name, input, notify URL), decoded alone; ``None`` if the
        history does not begin with it. Far cheaper than ``run`` when that is all a follower needs."""
        record = self.histories.first(self.saga_uuid)
        first: Any = self.mapper.to_domain_event(record) if record is not None else None
        return first if isinstance(first, ev.SagaStarted) else None

    @cached_property
    def run(self) -> SagaRun:
        """The saga's state right after this event (folded from its history)."""
        aggregate: Any = None
        for record in self.history:
            if record.originator_version > self.event.originator_version:
                break
            event: Any = self.mapper.to_domain_event(record)
            aggregate = event.mutate(aggregate)
        run: SagaRun = aggregate.run
        return run

    @property
    def saga(self) -> str:
        """The saga's name."""
        return self.run.saga

    @property
    def saga_id(self) -> str:
        """The saga's id."""
        return self.run.saga_id

    @property
    def input(self) -> dict[str, Any]:
        """The saga's input, as stored (JSON data)."""
        return self.run.input


class Follower(Protocol):
    """Something kept from the log: it says which event types it wants and records each batch."""

    @property
    def name(self) -> str:
        """Unique among followers; its position is tracked under it."""

    @property
    def events(self) -> Sequence[str]:
        """Event type names it follows (``SagaCompleted``, ...); empty: all of them."""

    def record(self, changes: list[Change], tracking: Tracking, index: SagaIndex) -> None:
        """Write what ``changes`` mean and ``tracking`` in one transaction (an empty batch advances only)."""

    def reset(self, index: SagaIndex) -> None:
        """Forget what was recorded, and the position, before a rebuild from the start of the log."""


@dataclass(frozen=True)
class Lag:
    """How far a follower is behind the log."""

    events: int
    """Notifications after its position."""
    seconds: float
    """Age of the oldest notification it has not processed (0 when it is caught up)."""


def read_batch(
    recorder: ApplicationRecorder, position: int, limit: int, topics: Sequence[str] = ()
) -> tuple[Sequence[Notification], int]:
    """The notifications after ``position`` (of ``topics``; all if none), and the position reached.

    A short batch means the log was read up to its head: the position moves past the events the
    reader does not want, so its lag says what is really left.
    """
    head = recorder.max_notification_id() or 0
    if head <= position:
        return [], position
    notifications = recorder.select_notifications(position, limit, stop=head, topics=topics, inclusive_of_start=False)
    return notifications, notifications[-1].id if len(notifications) == limit else head


class Log:
    """Reads the saga log for followers: batches after a position, filtered by type, with histories."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    def catch_up(self, follower: Follower, *, limit: int = BATCH) -> int:
        """Process one batch after the follower's position; how many notifications it read.

        If another process recorded the same batch first, this one's write is refused and
        nothing is lost: the next call starts from the new position.
        """
        store = self.repository.store
        index = store.index
        name = tracking_name(follower.name)
        position = index.tracked(name) or 0
        topics = [TOPICS[t] for t in follower.events] if follower.events else []
        notifications, reached = read_batch(store.recorder, position, limit, topics)
        if reached == position:
            return 0
        histories = Histories(index, list(dict.fromkeys(_uuid(n.originator_id) for n in notifications)))
        changes = []
        for n in notifications:
            event: Any = store.mapper.to_domain_event(n)
            changes.append(Change(n.id, event, histories, store.mapper))
        try:
            follower.record(changes, Tracking(name, reached), index)
        except IntegrityError:
            return 0  # another process recorded this batch (or a later one) first
        return len(notifications) or 1

    def rebuild(self, follower: Follower) -> int:
        """Forget the follower's work and position, then process the whole log again; rounds taken."""
        follower.reset(self.repository.index)
        return self.drain(follower)

    def drain(self, follower: Follower) -> int:
        """Process batches until the follower is caught up; how many rounds it took."""
        rounds = 0
        while self.catch_up(follower):
            rounds += 1
        return rounds

    def lag(self, follower: Follower) -> Lag:
        """How far ``follower`` is behind (a follower that never ran is behind by the whole log)."""
        store = self.repository.store
        position = store.index.tracked(tracking_name(follower.name)) or 0
        head = store.recorder.max_notification_id() or 0
        if head <= position:
            return Lag(0, 0.0)
        first = store.recorder.select_notifications(position, 1, inclusive_of_start=False)
        if not first:
            return Lag(head - position, 0.0)
        event: Any = store.mapper.to_domain_event(first[0])
        return Lag(head - position, max(0.0, (datetime.now(UTC) - event.timestamp).total_seconds()))
