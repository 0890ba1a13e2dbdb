"""A schedule as an event-sourced aggregate: created, edited, paused (with a reason), resumed,
deleted, and every tick it fired, skipped or held back, in its history."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import BaseAggregate, CanInitAggregate
from eventsourcing.utils import register_topic

from orchestrator.events.base import ModelEvent, created
from orchestrator.schedules.spec import ScheduleSpec

TOPIC = "sagaworks.Schedule"
RECENT = 10
"""Runs a schedule's row keeps (its history keeps them all)."""


def schedule_uuid(schedule_id: str) -> UUID:
    """The aggregate id of a schedule id."""
    return uuid5(NAMESPACE_URL, f"sagaworks:schedule:{schedule_id}")


class ScheduleEvent(ModelEvent):
    """Base of a schedule's events (not saga events: the saga log's readers leave them alone)."""

    family: ClassVar[bool] = True

    def apply(self, aggregate: Any) -> None:
        self.evolve(aggregate)

    def evolve(self, schedule: Schedule) -> None:
        """Change the schedule as this event says."""


class ScheduleCreated(ScheduleEvent, CanInitAggregate[UUID]):
    """A schedule was created (``declared``: from a saga class's ``schedules``)."""

    originator_topic: str
    schedule_id: str
    spec: ScheduleSpec
    declared: bool = False

    def apply(self, aggregate: Any) -> None:
        aggregate.schedule_id, aggregate.spec, aggregate.declared = self.schedule_id, self.spec, self.declared
        aggregate.created, aggregate.paused, aggregate.reason, aggregate.deleted = self.timestamp, False, None, False
        aggregate.last_tick, aggregate.last_saga_id, aggregate.buffered = None, None, None
        aggregate.runs = []


class ScheduleEdited(ScheduleEvent):
    """The schedule's definition changed (an edit, or a new release's declaration)."""

    spec: ScheduleSpec

    def evolve(self, schedule: Schedule) -> None:
        schedule.spec = self.spec


class SchedulePaused(ScheduleEvent):
    """The schedule stopped firing until it is resumed."""

    reason: str | None = None

    def evolve(self, schedule: Schedule) -> None:
        schedule.paused, schedule.reason = True, self.reason


class ScheduleResumed(ScheduleEvent):
    """The schedule fires again (ticks missed while paused follow its catch-up policy)."""

    def evolve(self, schedule: Schedule) -> None:
        schedule.paused, schedule.reason = False, None


class ScheduleDeleted(ScheduleEvent):
    """The schedule was deleted: it fires no more."""

    def evolve(self, schedule: Schedule) -> None:
        schedule.deleted = True


class ScheduleFired(ScheduleEvent):
    """A tick started its saga (``manual``: by ``trigger`` or ``backfill``, not by the clock)."""

    tick: datetime
    saga_id: str
    manual: bool = False

    def evolve(self, schedule: Schedule) -> None:
        if not self.manual:
            schedule.last_tick = self.tick if schedule.last_tick is None else max(schedule.last_tick, self.tick)
            if schedule.buffered == self.tick:
                schedule.buffered = None
        schedule.last_saga_id = self.saga_id
        schedule.runs = [*schedule.runs, {"tick": self.tick.isoformat(), "saga_id": self.saga_id}][-RECENT:]


class ScheduleSkipped(ScheduleEvent):
    """A tick started nothing: its previous run was still going (overlap ``skip``)."""

    tick: datetime
    reason: str

    def evolve(self, schedule: Schedule) -> None:
        schedule.last_tick = self.tick
        schedule.runs = [*schedule.runs, {"tick": self.tick.isoformat(), "skipped": self.reason}][-RECENT:]


class ScheduleBuffered(ScheduleEvent):
    """A tick waits for the previous run to end (overlap ``buffer``: at most one waits)."""

    tick: datetime

    def evolve(self, schedule: Schedule) -> None:
        if schedule.buffered is not None and schedule.buffered != self.tick:  # one waits: the later one
            replaced = {"tick": schedule.buffered.isoformat(), "skipped": "replaced by a later tick while buffered"}
            schedule.runs = [*schedule.runs, replaced][-RECENT:]
        schedule.last_tick, schedule.buffered = self.tick, self.tick


class Schedule(BaseAggregate[UUID]):
    """One schedule; ``last_tick`` is the latest tick the clock has dealt with."""

    schedule_id: str
    spec: ScheduleSpec
    declared: bool
    created: datetime
    paused: bool
    reason: str | None
    deleted: bool
    last_tick: datetime | None
    last_saga_id: str | None
    buffered: datetime | None
    runs: list[dict[str, Any]]

    def __init__(self) -> None:
        """Schedules are made by ``new`` or replay."""

    @classmethod
    def new(cls, schedule_id: str, spec: ScheduleSpec, now: datetime, declared: bool = False) -> Schedule:
        """A new schedule with its ``ScheduleCreated`` pending."""
        event = ScheduleCreated(
            originator_id=schedule_uuid(schedule_id),
            originator_version=cls.INITIAL_VERSION,
            timestamp=now,
            originator_topic=TOPIC,
            schedule_id=schedule_id,
            spec=spec,
            declared=declared,
        )
        return created(event, cls)

    def record(self, event_class: type[ScheduleEvent], now: datetime, **data: Any) -> None:
        """Record one of the schedule's events."""
        event = event_class(originator_id=self.id, originator_version=self.version + 1, timestamp=now, **data)
        event.mutate(self)
        self.pending_events.append(event)

    def row(self) -> dict[str, Any]:
        """The schedule's read-model row (what ``saga schedules list`` and the scheduler read)."""
        upcoming = (
            None if self.paused or self.deleted else self.spec.next_tick(self.last_tick or self.created, self.created)
        )
        return {
            "schedule_id": self.schedule_id,
            "saga": self.spec.saga,
            "spec": self.spec.model_dump(mode="json", exclude_defaults=True),
            "paused": self.paused,
            "reason": self.reason,
            "deleted": self.deleted,
            "declared": self.declared,
            "next_fire_at": None if upcoming is None else upcoming.isoformat(),
            "buffered": None if self.buffered is None else self.buffered.isoformat(),
            "last_tick": None if self.last_tick is None else self.last_tick.isoformat(),
            "last_saga_id": self.last_saga_id,
            "runs": self.runs,
            "version": self.version,
        }


register_topic(TOPIC, Schedule)
