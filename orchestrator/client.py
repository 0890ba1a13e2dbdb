"""The ``Orchestrator``: what an application holds to start, steer and read sagas, and run workers.

It owns the settings, the saga registry and the repository (``repository.py``); workers and
read models reach storage through the repository, never through this object's internals.
"""

from __future__ import annotations

import builtins
import os
import socket
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import uuid4

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError

from orchestrator import retention, schedules
from orchestrator.admission import Admission
from orchestrator.changes import Changes
from orchestrator.commands import Commands, utcnow
from orchestrator.definition import Saga
from orchestrator.domain import DomainEvent, DomainEventRecord, SagaEnded, Trigger, validate_event
from orchestrator.errors import (
    DefinitionError,
    InvalidInput,
    UnknownEvent,
)
from orchestrator.following import Follower, Log
from orchestrator.notify import Deliveries, Notifications, Queueing
from orchestrator.reads import Reads
from orchestrator.registry import Registry, SagaRef
from orchestrator.repository import Repository
from orchestrator.safety import check_saga_id, event_payload, short
from orchestrator.schedules import Scheduler, ScheduleSpec
from orchestrator.settings import Settings
from orchestrator.storage import Database, SagaApplication, parse_database_url
from orchestrator.triggers import Triggering, TriggerProcessor
from orchestrator.worker import SideTask, Worker


def _process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Orchestrator(Commands, Reads):
    """Starts and steers sagas (``Commands``), answers about them (``Reads``), and runs workers.

    ``database`` is a URL (``sqlite:///path``, ``postgresql://...``, ``memory://``); without
    it ``settings.database_url`` is used, which ``Settings.from_env()`` reads from
    ``SAGA_DATABASE_URL`` and which defaults to the SQLite file ``sagaworks.db``. ``upstreams``
    says where the applications that ``on_change(...)`` triggers follow keep their events (a
    database URL, or the application instance); by default in this orchestrator's PostgreSQL
    database (on SQLite they need a file of their own).
    """

    def __init__(
        self,
        sagas: Iterable[type[Saga[Any]]] = (),
        database: str | None = None,
        *,
        settings: Settings | None = None,
        projections: Iterable[Follower] = (),
        events: Iterable[type[DomainEvent]] = (),
        upstreams: Mapping[type[Application[Any]], str | Application[Any]] | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.database: Database = parse_database_url(database or self.settings.database_url)
        self.registry = Registry(sagas)
        self.repository = Repository(self.database)
        self.projections: dict[str, Follower] = {}
        """The read models users write (``projections.Projection``), by name."""
        for projection in projections:
            self.add_projection(projection)
        self.log = Log(self.repository)
        """Reads the event log for the followers (projections, notifications)."""
        secret = self.settings.notify_secret.get_secret_value() if self.settings.notify_secret else None
        self.notifications = Notifications(
            self.repository, self.registry, secret, _process_id(), self.settings.lease_seconds
        )
        """Queues and delivers completion notifications (run by every worker: ``Queueing`` between
        rounds, ``Deliveries`` in a thread of its own)."""
        self.event_types: dict[str, type[DomainEvent]] = {SagaEnded.event_name: SagaEnded}
        """The domain events this orchestrator knows by name (given, and those its sagas' triggers name)."""
        for event_type in events:
            self.register_event(event_type)
        for saga in self.registry:
            self._register_events(saga)
        self.trigger_processor = TriggerProcessor(self.registry, self.repository, self.settings.max_input_bytes)
        self.changes = Changes(
            self.registry, self.repository, self.database, upstreams or {}, self.settings.max_input_bytes
        )
        """Follows the upstream applications that sagas' ``on_change(...)`` triggers name."""
        self.admission = Admission(self.registry, self.repository, utcnow)
        """Lets queued sagas in as their pools' limits allow (in every worker)."""
        self.scheduler = Scheduler(self.repository, self.registry, self.settings.max_input_bytes)
        """Manages schedules (``orch.scheduler.pause(...)``) and fires their due ticks in every worker."""
        self.side_tasks: builtins.list[SideTask] = [
            Queueing(self.notifications),
            Deliveries(self.notifications),
            Triggering(self.trigger_processor, self.log),
            self.changes,
            self.admission,
            self.scheduler,
        ]
        """Tasks every worker of this orchestrator runs between rounds (schedulers, notifiers)."""

    # Lifecycle

    def register(self, saga: type[Saga[Any]]) -> None:
        """Add a saga class to the registry (explicitly: importing a module registers nothing)."""
        self.registry.register(saga)
        self._register_events(saga)

    def _register_events(self, saga: type[Saga[Any]]) -> None:
        for trigger in saga.triggers:
            if isinstance(trigger, Trigger):
                self.register_event(trigger.event)

    def register_event(self, event_type: type[DomainEvent]) -> None:
        """Make a domain event known by its name (for ``emit(name, data)`` and ``POST /events/{name}``)."""
        if not (isinstance(event_type, type) and issubclass(event_type, DomainEvent)):
            raise DefinitionError(f"{event_type!r} is not a DomainEvent class")
        known = self.event_types.get(event_type.event_name)
        if known is not None and known is not event_type:
            raise DefinitionError(f"two domain events are named {event_type.event_name!r}")
        self.event_types[event_type.event_name] = event_type

    def emit(self, event: DomainEvent | str, data: dict[str, Any] | None = None, *, event_id: str | None = None) -> str:
        """Record a domain event (a model, or a known event's name and data); returns its id.

        ``event_id`` makes it idempotent: the same id again records nothing (with other data it raises
        ``InvalidInput``). Triggers start their sagas from it soon after, in a worker.
        """
        if isinstance(event, str):
            event_type = self.event_types.get(event)
            if event_type is None:
                known = ", ".join(sorted(self.event_types)) or "none"
                raise UnknownEvent(f"unknown domain event {short(event)}; known: {known}")
            model = validate_event(event_type, data or {})
        elif isinstance(event, DomainEvent) and data is None:
            model = event
        else:
            raise InvalidInput("emit() takes a DomainEvent, or an event name and its data")
        name, payload = model.event_name, event_payload(model, self.settings.max_input_bytes)
        event_id = uuid4().hex if event_id is None else check_saga_id(event_id)
        record = DomainEventRecord.new(event_id, name, payload, utcnow())
        try:
            with self.repository.translating("recording an event"):
                self.repository.store.events.put(record.collect_events())
        except IntegrityError:
            found: DomainEventRecord = self.repository.store.repository.get(record.id)
            if (found.name, found.data) != (name, payload):
                raise InvalidInput(f"event id {short(event_id)} was already used for another event") from None
        self.repository.wake_workers()
        return event_id

    def schedule(
        self, saga: SagaRef, spec: ScheduleSpec | None = None, *, schedule_id: str | None = None, **options: Any
    ) -> str:
        """Create a schedule at run time and return its id: ``cron="0 8 * * MON"``, ``every=`` (seconds or
        a timedelta) or ``at=`` (once), with ``tz``, ``input``, ``catch_up``, ``overlap``, ``jitter``,
        ``start`` and ``end`` as keywords (or a ready ``cron(...)``/``every(...)``/``once(...)``).

        With the id of an existing schedule it edits it. ``orch.scheduler`` pauses, resumes, triggers,
        backfills, lists and deletes schedules; every worker fires the due ticks, each exactly once.
        """
        if spec is None:
            spec = schedules.build(InvalidInput, **options)
        elif options:
            raise InvalidInput("schedule() takes a spec or keywords, not both")
        with self.repository.translating("creating a schedule"):
            return self.scheduler.create(saga, spec, schedule_id)

    def purge(
        self,
        older_than: timedelta,
        *,
        archive: str | Path | None = None,
        states: Iterable[str] = retention.FINISHED,
        batch: int = 500,
    ) -> retention.Purged:
        """Remove finished sagas last updated more than ``older_than`` ago from the read models; with
        ``archive`` (a JSON-lines file) also append their histories to it and delete them.

        ``failed`` sagas stay unless ``states`` names them; so do sagas with a notification still to
        deliver, and (with ``archive``) histories some follower of the log has not read yet. The
        built-in ``retention.Retention`` saga runs this on a schedule.
        """
        return retention.purge(self, older_than, archive=archive, states=states, batch=batch)

    def add_projection(self, projection: Follower) -> None:
        """Register a read model to keep from the log (``saga projections run`` keeps them current)."""
        known = self.projections.get(projection.name)
        if known is not None and known is not projection:
            raise DefinitionError(f"two projections are named {projection.name!r}")
        self.projections[projection.name] = projection

    def run_projections(self) -> int:
        """Bring every registered projection up to the end of the log now; batches recorded."""
        with self.repository.translating("running projections"):
            return sum(self.log.drain(projection) for projection in self.projections.values())

    def rebuild_projection(self, name: str) -> int:
        """Drop a projection's rows and position and replay the whole log into it; batches recorded."""
        with self.repository.translating("rebuilding a projection"):
            return self.log.rebuild(self._projection(name))

    def open(self) -> Orchestrator:
        """Open storage (creating or migrating its schema if needed). ``with orch:`` does this."""
        self.repository.open()
        return self

    def close(self) -> None:
        """Close storage."""
        self.repository.close()

    def __enter__(self) -> Orchestrator:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def store(self) -> SagaApplication:
        """The eventsourcing application that holds the histories, opened on first use."""
        return self.repository.store

    @property
    def sagas(self) -> dict[str, type[Saga[Any]]]:
        """The registered saga classes by name."""
        return self.registry.sagas

    # Workers and followers

    def run_worker(self, wait: bool = True, **options: Any) -> int:
        """Run steps: with ``wait=False`` drain what is runnable now and return; else run until
        SIGTERM/SIGINT (or the worker's ``stop``), then finish the attempts in hand and return.

        Options override the settings: ``concurrency``, ``batch_size``, ``lease_seconds``,
        ``poll_interval``, ``worker_id``. Returns how many step threads had not returned when the
        worker stopped (steps that hang: the process may want to exit without waiting for them).
        """
        worker = Worker(self, **options)
        worker.run(drain=not wait)
        return worker.threads_left
