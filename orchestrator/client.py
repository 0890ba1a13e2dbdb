"""The ``Orchestrator``: what an application holds to start, steer and read sagas, and run workers.

It owns the settings, the saga registry and the repository (``repository.py``); workers and
read models reach storage through the repository, never through this object's internals.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import uuid4

from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError
from pydantic import BaseModel

from orchestrator import metrics, retention, schedules
from orchestrator.admission import Admission
from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.changes import Changes
from orchestrator.definition import Saga
from orchestrator.domain import DomainEvent, DomainEventRecord, SagaEnded, Trigger, validate_event
from orchestrator.errors import (
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    SagaAlreadyStarted,
    SagaNotFound,
    UnexpectedEvent,
    UnknownEvent,
)
from orchestrator.following import Follower, Log
from orchestrator.notify import Notifications
from orchestrator.reads import Reads
from orchestrator.registry import Registry, SagaRef
from orchestrator.repository import Repository
from orchestrator.safety import check_saga_id, check_text, event_payload, short
from orchestrator.schedules import Scheduler, ScheduleSpec
from orchestrator.settings import Settings
from orchestrator.states import SagaState
from orchestrator.storage import Database, SagaApplication, parse_database_url
from orchestrator.triggers import Triggering, TriggerProcessor
from orchestrator.worker import SideTask, Worker

COMMAND_OUTAGES = 3
"""Transient storage errors a command waits out (about 1.4 s in all) before it reports one."""


def _process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Orchestrator(Reads):
    """Starts sagas, delivers events to them, answers about them (``Reads``), and runs workers.

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
        """Queues and delivers completion notifications (run by every worker, between rounds)."""
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
            self.notifications,
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

    # Commands

    def start(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        start_at: datetime | None = None,
        notify: str | None = None,
    ) -> str:
        """Start a saga and return its id; nothing runs until a worker picks it up.

        ``saga_id`` makes the start idempotent: a repeat with the same saga and input returns
        the id and starts nothing; with a different saga or input it raises ``SagaAlreadyStarted``.
        ``notify`` is a URL that gets the final status as a signed JSON POST once the saga ends.
        """
        aggregate = self._begin(saga, input, saga_id, start_at, notify)
        try:
            with self.repository.translating("starting a saga"):
                self.repository.save([aggregate], group=True)
        except IntegrityError:
            self._started_before(aggregate)
        else:
            metrics.SAGAS_STARTED.labels(aggregate.run.saga).inc()
        return aggregate.run.saga_id

    async def start_async(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        start_at: datetime | None = None,
        notify: str | None = None,
    ) -> str:
        """``start`` for a coroutine (an ASGI handler, an asyncio service): the same answer and errors,
        but the event loop goes on while the start commits, with every other start, send, cancel and
        retry of this process that arrives meanwhile (group commit), and no thread is taken per call."""
        aggregate = self._begin(saga, input, saga_id, start_at, notify)
        try:
            with self.repository.translating("starting a saga"):
                await self.repository.save_async([aggregate])
        except IntegrityError:
            await asyncio.to_thread(self._started_before, aggregate)
        else:
            metrics.SAGAS_STARTED.labels(aggregate.run.saga).inc()
        return aggregate.run.saga_id

    def _begin(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        saga_id: str | None,
        start_at: datetime | None,
        notify: str | None,
    ) -> SagaAggregate:
        saga_class = self.registry.saga_class(saga)
        return SagaAggregate.begin(saga_class, input, saga_id, start_at, self.settings.max_input_bytes, notify)

    def _started_before(self, aggregate: SagaAggregate) -> None:
        """A start's id is taken: fine if by the same start (a repeat, or our own commit whose
        acknowledgement was lost), else ``SagaAlreadyStarted``."""
        existing = self._load(aggregate.run.saga_id)
        if existing.run.saga != aggregate.run.saga or existing.run.input != aggregate.run.input:
            raise SagaAlreadyStarted(
                f"saga id {short(aggregate.run.saga_id)} was already used to start {existing.run.saga} with other input"
            ) from None

    def start_many(
        self,
        saga: SagaRef,
        inputs: Iterable[BaseModel | dict[str, Any]],
        *,
        saga_ids: Iterable[str] | None = None,
        start_at: datetime | None = None,
    ) -> builtins.list[str]:
        """Start many sagas of one kind in one transaction; each behaves as ``start`` would.

        Every input is validated first: one bad input raises and starts nothing.
        """
        saga_class = self.registry.saga_class(saga)
        inputs = builtins.list(inputs)
        ids: builtins.list[str | None] = [None] * len(inputs) if saga_ids is None else builtins.list(saga_ids)
        if len(ids) != len(inputs):
            raise InvalidInput(f"{len(inputs)} inputs but {len(ids)} saga ids")
        given = [check_saga_id(i) for i in ids if i is not None]
        if len(set(given)) != len(given):
            raise InvalidInput("saga_ids repeat an id")
        aggregates = [
            SagaAggregate.begin(saga_class, data, i, start_at, self.settings.max_input_bytes)
            for data, i in zip(inputs, ids, strict=True)
        ]
        if not aggregates:
            return []
        try:
            with self.repository.translating("starting sagas"):
                self.repository.save(aggregates)
            metrics.SAGAS_STARTED.labels(saga_class.name).inc(len(aggregates))
        except IntegrityError:  # some were started before: settle each as start() does
            return [self.start(saga_class, a.run.input, saga_id=a.run.saga_id, start_at=start_at) for a in aggregates]
        return [a.run.saga_id for a in aggregates]

    def send(self, saga_id: str, event: str, data: BaseModel | dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to a saga that waits for it, now or later in its plan.

        Raises ``UnexpectedEvent`` (writing nothing) for an event the saga does not wait for,
        one already delivered, or a saga that has finished.
        """
        if not isinstance(event, str) or not event or len(event) > 200 or not event.isprintable():
            raise InvalidInput(f"an event name is a non-empty printable string, not {short(event)}")
        payload = event_payload(data, self.settings.max_input_bytes)

        def deliver(aggregate: SagaAggregate) -> None:
            refusal = aggregate.run.refusal(event)
            if refusal is not None:
                raise UnexpectedEvent(f"saga {short(saga_id)} {refusal}")
            aggregate.deliver(event, payload, utcnow())

        self._command(saga_id, deliver)

    def cancel(self, saga_id: str, reason: str | None = None, *, compensate: bool = True) -> None:
        """Cancel a running or waiting saga: what it did is compensated, then it ends ``cancelled``.

        With ``compensate=False`` the saga ends ``cancelled`` where it stands and nothing more
        runs, not even a compensation: the way out of ``failed`` (or of a saga whose input
        makes every step fail) for an operator who has undone what was needed by hand.
        """
        reason = check_text(reason, "a reason")

        def cancel(aggregate: SagaAggregate) -> None:
            run = aggregate.run
            if not compensate:
                if run.state.terminal and run.state is not SagaState.FAILED:
                    raise InvalidTransition(f"saga {short(saga_id)} is {run.state.value}: there is nothing to end")
                aggregate.terminate(reason, utcnow())
                return
            if run.state.terminal:
                raise InvalidTransition(f"saga {short(saga_id)} is {run.state.value}: there is nothing to cancel")
            if run.cancel_requested:
                return
            if run.compensating:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is already compensating after a failure"
                    " (cancel with compensate=False to stop it where it stands)"
                )
            aggregate.cancel(reason, utcnow())

        self._command(saga_id, cancel)

    def retry(self, saga_id: str) -> None:
        """Resume a ``failed`` saga: its failed compensation runs again, then the rest of the undo."""

        def retry(aggregate: SagaAggregate) -> None:
            if aggregate.run.state is not SagaState.FAILED:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is {aggregate.run.state.value}: only a failed saga can be retried"
                )
            aggregate.retry(utcnow())

        self._command(saga_id, retry)

    async def send_async(self, saga_id: str, event: str, data: BaseModel | dict[str, Any] | None = None) -> None:
        """``send`` for a coroutine: it runs in a worker thread (it reads the saga first), its write
        grouped with this process's other commands."""
        await asyncio.to_thread(self.send, saga_id, event, data)

    async def cancel_async(self, saga_id: str, reason: str | None = None, *, compensate: bool = True) -> None:
        """``cancel`` for a coroutine, as ``send_async``."""
        await asyncio.to_thread(lambda: self.cancel(saga_id, reason, compensate=compensate))

    async def retry_async(self, saga_id: str) -> None:
        """``retry`` for a coroutine, as ``send_async``."""
        await asyncio.to_thread(self.retry, saga_id)

    def resolve_compensation(self, saga_id: str, step: str, reason: str | None = None) -> None:
        """Mark the failed compensation of ``step`` as done by hand: the rest of the undo runs.

        For a ``failed`` saga whose compensation cannot succeed (the booking was cancelled by
        phone, say); ``retry`` is the way when the compensation itself can now succeed.
        """
        reason = check_text(reason, "a reason")

        def resolve(aggregate: SagaAggregate) -> None:
            run = aggregate.run
            failed = [node.plan.name for node in run.nodes if node.compensation_failed]
            if run.state is not SagaState.FAILED or step not in failed:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is {run.state.value}; only a failed compensation can be resolved"
                    + (f" (failed: {', '.join(failed)})" if failed else "")
                )
            aggregate.resolve(step, reason, utcnow())

        self._command(saga_id, resolve)

    def _command(self, saga_id: str, command: Callable[[SagaAggregate], None]) -> None:
        uuid = aggregate_id(check_saga_id(saga_id))
        try:
            with self.repository.translating("recording a command"):
                self.repository.update(uuid, command, outages=COMMAND_OUTAGES, group=True)
        except SagaNotFound:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None

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

    def _load(self, saga_id: str) -> SagaAggregate:
        try:
            with self.repository.translating("loading a saga"):
                return self.repository.load(aggregate_id(saga_id))
        except SagaNotFound:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None
