"""The ``Orchestrator``: what an application holds to start, steer and read sagas, and run workers.

It owns the settings, the saga registry and the repository (``repository.py``); workers and
read models reach storage through the repository, never through this object's internals.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from eventsourcing.persistence import IntegrityError
from pydantic import BaseModel

from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.definition import Saga
from orchestrator.errors import InvalidInput, InvalidTransition, SagaAlreadyStarted, SagaNotFound, UnexpectedEvent
from orchestrator.readmodels.history import HistoryEvent, history_entries
from orchestrator.readmodels.listing import MAX_PAGE, Filters, SagaPage, encode_cursor
from orchestrator.readmodels.status import SagaStatus, status_of
from orchestrator.readmodels.timeline import TimelineEntry, timeline_of
from orchestrator.registry import Registry, SagaRef
from orchestrator.repository import Repository
from orchestrator.safety import check_saga_id, check_text, event_payload, short
from orchestrator.settings import Settings
from orchestrator.states import SagaState
from orchestrator.storage import Database, SagaApplication, parse_database_url
from orchestrator.worker import SideTask, Worker

COMMAND_OUTAGES = 3
"""Transient storage errors a command waits out (about 1.4 s in all) before it reports one."""


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Orchestrator:
    """Starts sagas, delivers events to them, answers about them, and runs workers.

    ``database`` is a URL (``sqlite:///path``, ``postgresql://...``, ``memory://``); without
    it ``settings.database_url`` is used, which ``Settings.from_env()`` reads from
    ``SAGA_DATABASE_URL`` and which defaults to the SQLite file ``sagaworks.db``.
    """

    def __init__(
        self,
        sagas: Iterable[type[Saga[Any]]] = (),
        database: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.database: Database = parse_database_url(database or self.settings.database_url)
        self.registry = Registry(sagas)
        self.repository = Repository(self.database)
        self.side_tasks: builtins.list[SideTask] = []
        """Tasks every worker of this orchestrator runs between rounds (schedulers, notifiers)."""

    # Lifecycle

    def register(self, saga: type[Saga[Any]]) -> None:
        """Add a saga class to the registry (explicitly: importing a module registers nothing)."""
        self.registry.register(saga)

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
        saga_class = self.registry.saga_class(saga)
        aggregate = SagaAggregate.begin(saga_class, input, saga_id, start_at, self.settings.max_input_bytes, notify)
        try:
            with self.repository.translating("starting a saga"):
                self.repository.save([aggregate])
        except IntegrityError:
            # Either started before, or our own commit landed and its acknowledgement was lost.
            existing = self._load(aggregate.run.saga_id)
            if existing.run.saga != saga_class.name or existing.run.input != aggregate.run.input:
                raise SagaAlreadyStarted(
                    f"saga id {short(aggregate.run.saga_id)} was already used to start {existing.run.saga}"
                    " with other input"
                ) from None
        return aggregate.run.saga_id

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
                self.repository.update(uuid, command, outages=COMMAND_OUTAGES)
        except SagaNotFound:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None

    # Queries

    def status(self, saga_id: str) -> SagaStatus:
        """The saga's status, from the status read model (current as soon as ``start`` returns)."""
        with self.repository.translating("reading a status"):
            doc = self.repository.index.get_status(aggregate_id(check_saga_id(saga_id)))
        if doc is None:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return SagaStatus.model_validate_json(doc)

    def wait(self, saga_id: str, timeout: float | None = None) -> SagaStatus:
        """Block until the saga is terminal and return its status; ``TimeoutError`` after ``timeout`` s.

        Waiting runs nothing: a worker (``run_worker`` or ``saga worker``) must be running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            status = self.status(saga_id)
            if status.state.terminal:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"saga {short(saga_id)} is still {status.state.value} after {timeout} s")
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)

    def list(
        self,
        state: SagaState | str | None = None,
        saga: SagaRef | None = None,
        limit: int | None = None,
        **filters: Any,
    ) -> builtins.list[SagaStatus]:
        """Sagas, most recently updated first: all that match, or the first ``limit``.

        Filters: ``state``, ``saga``, ``created_after``/``created_before``,
        ``updated_after``/``updated_before`` (aware datetimes), ``search={"field": value}`` (input
        fields the saga class declares in ``search``). ``page`` gives them a page at a time.
        """
        found: builtins.list[SagaStatus] = []
        cursor = None
        while True:
            size = MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(found))
            page = self.page(state, saga, limit=size, cursor=cursor, **filters)
            found += page.items
            cursor = page.next_cursor
            if cursor is None or (limit is not None and len(found) >= limit):
                return found

    def page(
        self,
        state: SagaState | str | None = None,
        saga: SagaRef | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
        **filters: Any,
    ) -> SagaPage:
        """One page of ``list``: up to ``limit`` sagas (at most 1000) and the cursor of the next page."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}, not {short(limit)}")
        query = self._filters(state, saga, filters).query(cursor)
        with self.repository.translating("listing sagas"):
            docs = self.repository.index.list_status(query, limit + 1)
        items = [SagaStatus.model_validate_json(doc) for doc in docs[:limit]]
        return SagaPage(items=items, next_cursor=encode_cursor(items[-1]) if len(docs) > limit else None)

    def counts(
        self, state: SagaState | str | None = None, saga: SagaRef | None = None, **filters: Any
    ) -> dict[str, dict[str, int]]:
        """How many sagas there are by saga name and state (with the filters of ``list``)."""
        query = self._filters(state, saga, filters).query()
        with self.repository.translating("counting sagas"):
            rows = self.repository.index.count_status(query)
        counts: dict[str, dict[str, int]] = {}
        for name, state_, n in rows:
            counts.setdefault(name, {})[state_] = n
        return counts

    def _filters(self, state: SagaState | str | None, saga: SagaRef | None, filters: dict[str, Any]) -> Filters:
        name = None if saga is None else self.registry.saga_class(saga).name
        try:
            return Filters(state=state, saga=name, **filters)
        except TypeError:
            known = "created_after, created_before, updated_after, updated_before, search"
            raise InvalidInput(f"unknown filter among {', '.join(filters)}; filters are {known}") from None

    def status_at(self, saga_id: str, when: datetime) -> SagaStatus:
        """The saga's status as it was at ``when`` (an aware datetime), folded from its history."""
        if not isinstance(when, datetime) or when.utcoffset() is None:
            raise InvalidInput(f"when must be a timezone-aware datetime, not {short(when)}")
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        aggregate: Any = None
        for event in events:
            if event.timestamp > when:
                break
            aggregate = event.mutate(aggregate)
        if aggregate is None:
            raise SagaNotFound(f"saga {short(saga_id)} was started after {when.isoformat()}")
        return status_of(aggregate.run)

    def timeline(self, saga_id: str) -> builtins.list[TimelineEntry]:
        """Every attempt of every step, compensation and wait of the saga, in order, with its timing."""
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return timeline_of(events)

    def history(self, saga_id: str) -> builtins.list[HistoryEvent]:
        """The saga's events in order: its whole life, the truth everything else derives from."""
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return history_entries(events)

    def projection_lag(self) -> dict[str, dict[str, float]]:
        """How far each registered projection is behind the event log: ``lag_events``, ``lag_seconds``."""
        return {}

    # Workers

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
