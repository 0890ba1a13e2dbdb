"""Domain events: facts of the application (a claim was submitted, a customer registered) that
sagas can be started by.

Users define them as pydantic models (``class ClaimSubmitted(DomainEvent)``) and record them with
``orch.emit(event)``; a step records them with ``self.emit(event)``, atomically with its outcome.
Each is kept in the event store as the one event of its own record (``DomainEventRecorded``),
whose id comes from the event's id: emitting the same event id twice records it once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application
from eventsourcing.domain import BaseAggregate, CanInitAggregate
from eventsourcing.utils import get_topic, register_topic
from pydantic import BaseModel, ConfigDict

from orchestrator.errors import DefinitionError
from orchestrator.events.base import ModelEvent, created
from orchestrator.limits import Limits
from orchestrator.safety import short
from orchestrator.steps import is_name

RECORD_TOPIC = "sagaworks.DomainEventRecord"


class DomainEvent(BaseModel):
    """Base of the domain events users define; the event's name is its class name unless ``name`` says."""

    event_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("event_name", cls.__name__)
        if not is_name(name):
            raise DefinitionError(f"{cls.__qualname__}.event_name must be a printable name, not {name!r}")
        cls.event_name = name


class SagaEnded(DomainEvent):
    """The domain event every saga's end is (for chaining: start one saga when another ends)."""

    event_name: ClassVar[str] = "SagaEnded"

    saga: str
    saga_id: str
    state: str
    """``completed``, ``compensated``, ``cancelled`` or ``failed``."""
    result: dict[str, Any] = {}
    error: str | None = None


class DomainEventRecorded(ModelEvent, CanInitAggregate[UUID]):
    """A domain event was recorded by ``orch.emit`` (the record's one and only event); stored under
    ``sagaworks.DomainEventRecorded.v1``."""

    originator_topic: str
    event_id: str
    name: str
    data: dict[str, Any]

    def apply(self, aggregate: Any) -> None:
        aggregate.name, aggregate.data, aggregate.event_id = self.name, self.data, self.event_id


class DomainEventRecord(BaseAggregate[UUID]):
    """The record of one emitted domain event."""

    name: str
    data: dict[str, Any]
    event_id: str

    def __init__(self) -> None:
        """Records are made by ``new`` or replay."""

    @classmethod
    def new(cls, event_id: str, name: str, data: dict[str, Any], now: datetime) -> DomainEventRecord:
        """A record with its ``DomainEventRecorded`` pending."""
        event = DomainEventRecorded(
            originator_id=record_id(event_id),
            originator_version=cls.INITIAL_VERSION,
            timestamp=now,
            originator_topic=RECORD_TOPIC,
            event_id=event_id,
            name=name,
            data=data,
        )
        return created(event, cls)


register_topic(RECORD_TOPIC, DomainEventRecord)


def record_id(event_id: str) -> UUID:
    """The aggregate id of a domain event's record: the same event id, the same record."""
    return uuid5(NAMESPACE_URL, f"sagaworks:event:{event_id}")


def validate_event(event_type: type[DomainEvent], data: dict[str, Any]) -> DomainEvent:
    """``data`` as an instance of ``event_type``; ``InvalidInput`` naming the fields that fail."""
    from pydantic import ValidationError

    from orchestrator.errors import InvalidInput
    from orchestrator.safety import one_line

    try:
        return event_type.model_validate(data)
    except ValidationError as error:
        raise InvalidInput(f"invalid {event_type.event_name}: {one_line(error)}") from None


class EventInfo(BaseModel):
    """A domain event as ``orch.events()`` lists it, with what the triggers did with it."""

    model_config = ConfigDict(frozen=True)

    position: int
    """Its place in the log."""
    event_id: str
    name: str
    data: dict[str, Any]
    timestamp: datetime
    source: str | None = None
    """The saga whose step emitted it (``None``: ``orch.emit``)."""
    triggers: list[dict[str, Any]] | None = None
    """Per trigger that considered it: ``{"trigger", "started": saga_id}`` or ``{"trigger", "skipped": why}``;
    ``None`` until the trigger processor has seen it."""


@dataclass(frozen=True)
class Trigger:
    """One domain event type that starts a saga, with its condition and its input mapping."""

    event: type[DomainEvent]
    when: Callable[[Any], bool] | None = None
    input: Callable[[Any], BaseModel | dict[str, Any]] | None = None
    name: str | None = None
    """Names the trigger in saga ids and decisions; default ``<saga>.on.<event>``."""
    limits: Limits | None = None
    """Limits for the sagas this trigger starts (a pool named after the trigger), instead of the saga's."""

    def named(self, saga: str) -> str:
        """The trigger's name within ``saga``."""
        return self.name or f"{saga}.on.{self.event.event_name}"


def on(
    event: type[DomainEvent],
    *,
    when: Callable[[Any], bool] | None = None,
    input: Callable[[Any], BaseModel | dict[str, Any]] | None = None,
    name: str | None = None,
    limits: Limits | None = None,
) -> Trigger:
    """Start the saga whenever ``event`` is recorded and ``when(event)`` holds; its input is
    ``input(event)`` (default: the event's own fields)."""
    if not (isinstance(event, type) and issubclass(event, DomainEvent)):
        raise DefinitionError(f"on() takes a DomainEvent class, not {event!r}")
    for what, fn in (("when", when), ("input", input)):
        if fn is not None and not callable(fn):
            raise DefinitionError(f"on({event.__name__}, {what}=...) must be callable, not {fn!r}")
    return Trigger(event, when, input, name, _limits(limits))


@dataclass(frozen=True)
class ChangeTrigger:
    """One event type of an upstream application that starts a saga, with a condition and an input mapping."""

    upstream: type[Application[Any]]
    event: type
    when: Callable[[Any], bool] | None = None
    input: Callable[[Any], BaseModel | dict[str, Any]] | None = None
    name: str | None = None
    """Names the trigger in saga ids and decisions; default ``<saga>.on.<upstream>.<event>``."""
    limits: Limits | None = None
    """Limits for the sagas this trigger starts (a pool named after the trigger), instead of the saga's."""

    @property
    def topic(self) -> str:
        """The upstream event's stored topic (what the upstream log is filtered by)."""
        return get_topic(self.event)

    def named(self, saga: str) -> str:
        """The trigger's name within ``saga``."""
        return self.name or f"{saga}.on.{self.upstream.name}.{self.event.__qualname__.rsplit('.', 1)[-1]}"


def on_change(
    upstream: type[Application[Any]],
    event: type,
    *,
    when: Callable[[Any], bool] | None = None,
    input: Callable[[Any], BaseModel | dict[str, Any]] | None = None,
    name: str | None = None,
    limits: Limits | None = None,
) -> ChangeTrigger:
    """Start the saga for each ``event`` the ``upstream`` application records (when ``when(event)``);
    its input is ``input(event)``, by default the event's fields and its ``originator_id``."""
    if not (isinstance(upstream, type) and issubclass(upstream, Application)):
        raise DefinitionError(f"on_change() takes an eventsourcing Application class, not {upstream!r}")
    if not isinstance(event, type):
        raise DefinitionError(f"on_change({upstream.__name__}, ...) takes the upstream's event class, not {event!r}")
    for what, fn in (("when", when), ("input", input)):
        if fn is not None and not callable(fn):
            raise DefinitionError(f"on_change({upstream.__name__}, {what}=...) must be callable, not {fn!r}")
    return ChangeTrigger(upstream, event, when, input, name, _limits(limits))


def _limits(limits: Any) -> Limits | None:
    if limits is not None and not isinstance(limits, Limits):
        raise DefinitionError(f"a trigger's limits= is a Limits(...), not {limits!r}")
    return limits


def check_triggers(cls: type, triggers: Sequence[Any]) -> list[Trigger | ChangeTrigger]:
    """A saga class's ``triggers``, each an ``on(...)`` or ``on_change(...)``; ``DefinitionError`` otherwise."""
    if not isinstance(triggers, list | tuple) or not all(isinstance(t, Trigger | ChangeTrigger) for t in triggers):
        raise DefinitionError(
            f"{cls.__qualname__}.triggers is a list of on(EventClass, ...) or on_change(App, EventClass, ...), "
            f"not {short(triggers)}"
        )
    names = [t.named(cls.__name__) for t in triggers]
    if len(set(names)) != len(names):
        raise DefinitionError(f"{cls.__qualname__} has two triggers named alike: give them name=...")
    return list(triggers)
