"""The base of every saga event: its place in the fold, its stored topic, the step it is about."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, TypeVar
from uuid import UUID

from eventsourcing.domain import BaseAggregate, CanMutateAggregate
from eventsourcing.utils import register_topic
from pydantic import BaseModel, ConfigDict

from orchestrator.machine import SagaRun

A = TypeVar("A", bound=BaseAggregate[UUID])


class ModelEvent(BaseModel, CanMutateAggregate[UUID]):
    """An event the library stores as a frozen pydantic model: the originator's id, version and time,
    and an explicit topic, ``sagaworks.<Name>.v1``, registered for every concrete class (a family's
    base, which sets ``family = True`` in its own body, is left unregistered). The base of saga
    events, schedule events and domain-event records alike."""

    model_config = ConfigDict(frozen=True)
    topic: ClassVar[str] = ""
    family: ClassVar[bool] = False

    originator_id: UUID
    originator_version: int
    timestamp: datetime

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            return
        cls.topic = f"sagaworks.{cls.__name__}.v1"
        register_topic(cls.topic, cls)


def created(event: Any, kind: type[A]) -> A:
    """The aggregate of type ``kind`` that an initial event makes, with the event pending on it."""
    aggregate = event.mutate(None)
    assert isinstance(aggregate, kind)
    aggregate.pending_events.append(event)
    return aggregate


class SagaEvent(ModelEvent):
    """Base of every saga event."""

    family: ClassVar[bool] = True

    def apply(self, aggregate: Any) -> None:
        run: SagaRun = aggregate.run
        self.evolve(run)
        run.version = self.originator_version
        run.updated_at = self.timestamp

    def evolve(self, run: SagaRun) -> None:
        """Change ``run`` as this event says."""

    @property
    def step(self) -> str | None:
        """The step or wait this event is about, if any."""
        return None


class StepEvent(SagaEvent):
    """An event about one attempt of a step or a compensation."""

    name: str
    attempt: int = 0

    @property
    def step(self) -> str | None:
        return self.name
