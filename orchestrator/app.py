"""The ``Orchestrator``: owns settings, storage and the saga registry; starts, steers and reads sagas."""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.persistence import IntegrityError, PersistenceError, StoredEvent
from pydantic import BaseModel, ValidationError

from orchestrator.aggregate import SagaAggregate, aggregate_id, policies_of
from orchestrator.definition import JSON_OBJECT, Saga
from orchestrator.errors import (
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    OrchestratorError,
    SagaAlreadyStarted,
    SagaNotFound,
    UnexpectedEvent,
    UnknownSaga,
)
from orchestrator.events import SagaEvent
from orchestrator.retry import RetryPolicy
from orchestrator.safety import check_saga_id, check_text, clean_error, encode, short, unstorable
from orchestrator.settings import Settings
from orchestrator.status import HistoryEvent, SagaState, SagaStatus
from orchestrator.store import Database, EventStore, IndexEntry, open_store, parse_database_url, storage_error

SagaRef = type[Saga[Any]] | str
COMMAND_RETRIES = 8


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def index_entry(aggregate: SagaAggregate) -> IndexEntry:
    """The index rows of an aggregate as it is now."""
    run = aggregate.run
    return IndexEntry(
        saga_uuid=aggregate.id,
        saga_id=run.saga_id,
        saga=run.saga,
        state=run.state.value,
        version=aggregate.version,
        due_at=run.due_at,
        created_at=run.created_at,
        updated_at=run.updated_at,
        doc=run.status_json(),
    )


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
        self.sagas: dict[str, type[Saga[Any]]] = {}
        self.policies: dict[str, dict[tuple[str, str], RetryPolicy]] = {}
        for saga in sagas:
            self.register(saga)
        self._store: EventStore | None = None
        self._lock = threading.Lock()
        self._wakers: builtins.list[Callable[[], None]] = []

    # Lifecycle

    def register(self, saga: type[Saga[Any]]) -> None:
        """Add a saga class to the registry (explicitly: importing a module registers nothing)."""
        if not (isinstance(saga, type) and issubclass(saga, Saga) and hasattr(saga, "nodes")):
            raise DefinitionError(f"{saga!r} is not a saga class (subclass Saga[InputModel])")
        known = self.sagas.get(saga.name)
        if known is not None and known is not saga:
            raise DefinitionError(f"two sagas are named {saga.name!r}: {known.__qualname__} and {saga.__qualname__}")
        self.sagas[saga.name] = saga
        self.policies[saga.name] = policies_of(saga)

    def open(self) -> Orchestrator:
        """Open storage (creating its schema if needed). ``with orch:`` does this."""
        with self._lock:
            if self._store is None:
                self._store = open_store(self.database)
        return self

    def close(self) -> None:
        """Close storage."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> Orchestrator:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def store(self) -> EventStore:
        """The event store, opened on first use."""
        return self._store or self.open()._store  # type: ignore[return-value]

    # Commands

    def start(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        start_at: datetime | None = None,
    ) -> str:
        """Start a saga and return its id; nothing runs until a worker picks it up.

        ``saga_id`` makes the start idempotent: a repeat with the same saga and input returns
        the id and starts nothing; with a different saga or input it raises ``SagaAlreadyStarted``.
        """
        saga_class = self.saga_class(saga)
        aggregate = self._new_saga(saga_class, input, saga_id, start_at)
        try:
            with self.translating("starting a saga"):
                self.save([aggregate])
        except IntegrityError:
            # Either started before, or our own commit landed and its acknowledgement was lost.
            existing = self._load(aggregate.run.saga_id)
            if existing.run.saga != saga_class.name or existing.run.input != aggregate.run.input:
                raise SagaAlreadyStarted(
                    f"saga id {aggregate.run.saga_id!r} was already used to start {existing.run.saga} with other input"
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
        saga_class = self.saga_class(saga)
        inputs = builtins.list(inputs)
        ids: builtins.list[str | None] = [None] * len(inputs) if saga_ids is None else builtins.list(saga_ids)
        if len(ids) != len(inputs):
            raise InvalidInput(f"{len(inputs)} inputs but {len(ids)} saga ids")
        given = [check_saga_id(i) for i in ids if i is not None]
        if len(set(given)) != len(given):
            raise InvalidInput("saga_ids repeat an id")
        aggregates = [self._new_saga(saga_class, data, i, start_at) for data, i in zip(inputs, ids, strict=True)]
        if not aggregates:
            return []
        try:
            with self.translating("starting sagas"):
                self.save(aggregates)
        except IntegrityError:  # some were started before: settle each as start() does
            return [self.start(saga_class, a.run.input, saga_id=a.run.saga_id, start_at=start_at) for a in aggregates]
        return [a.run.saga_id for a in aggregates]

    def _new_saga(
        self,
        saga_class: type[Saga[Any]],
        data: BaseModel | dict[str, Any],
        saga_id: str | None,
        start_at: datetime | None,
    ) -> SagaAggregate:
        saga_id = uuid4().hex if saga_id is None else check_saga_id(saga_id)
        payload = self.validate_input(saga_class, data)
        if start_at is not None and (not isinstance(start_at, datetime) or start_at.utcoffset() is None):
            raise InvalidInput(f"start_at must be a timezone-aware datetime, not {short(start_at)}")
        return SagaAggregate.start(saga_class, saga_id, payload, utcnow(), start_at)

    def send(self, saga_id: str, event: str, data: BaseModel | dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to a saga that waits for it, now or later in its plan.

        Raises ``UnexpectedEvent`` (writing nothing) for an event the saga does not wait for,
        one already delivered, or a saga that has finished.
        """
        if not isinstance(event, str) or not event or len(event) > 200 or not event.isprintable():
            raise InvalidInput(f"an event name is a non-empty printable string, not {short(event)}")
        payload = self._payload(data)

        def deliver(aggregate: SagaAggregate) -> None:
            run = aggregate.run
            if not run.expects(event):
                raise UnexpectedEvent(_why_unexpected(run.saga_id, run.state, event, aggregate))
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

    def retry(self, saga_id: str) -> None:
        """Resume a ``failed`` saga: its failed compensation runs again, then the rest of the undo."""

        def retry(aggregate: SagaAggregate) -> None:
            if aggregate.run.state is not SagaState.FAILED:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is {aggregate.run.state.value}: only a failed saga can be retried"
                )
            aggregate.retry(utcnow())

        self._command(saga_id, retry)

    # Queries

    def status(self, saga_id: str) -> SagaStatus:
        """The saga's status, from the status read model (current as soon as ``start`` returns)."""
        with self.translating("reading a status"):
            doc = self.store.index.get_status(aggregate_id(check_saga_id(saga_id)))
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
        self, state: SagaState | str | None = None, saga: SagaRef | None = None, limit: int = 100
    ) -> builtins.list[SagaStatus]:
        """Sagas, most recently updated first, optionally of one state and one saga."""
        if state is not None:
            try:
                state = SagaState(state)
            except ValueError:
                states = ", ".join(s.value for s in SagaState)
                raise InvalidInput(f"unknown state {state!r}; states are {states}") from None
        name = None if saga is None else self.saga_class(saga).name
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be an integer from 1 to 10000, not {limit!r}")
        with self.translating("listing sagas"):
            docs = self.store.index.list_status(None if state is None else state.value, name, limit)
        return [SagaStatus.model_validate_json(doc) for doc in docs]

    def history(self, saga_id: str) -> builtins.list[HistoryEvent]:
        """The saga's events in order: its whole life, the truth everything else derives from."""
        store = self.store
        with self.translating("reading a history"):
            stored = store.recorder.select_events(aggregate_id(check_saga_id(saga_id)))
        if not stored:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        entries = []
        for record in stored:
            event: SagaEvent = store.mapper.to_domain_event(record)  # type: ignore[assignment]
            data = event.model_dump(
                mode="json", exclude={"originator_id", "originator_version", "timestamp", "originator_topic"}
            )
            entries.append(
                HistoryEvent(
                    type=type(event).__name__,
                    version=event.originator_version,
                    timestamp=event.timestamp,
                    step=event.step,
                    data=data,
                )
            )
        return entries

    # Workers

    def run_worker(self, wait: bool = True, **options: Any) -> int:
        """Run steps: with ``wait=False`` drain what is runnable now and return; else run until
        SIGTERM/SIGINT (or ``stop_worker``), then finish the attempts in hand and return.

        Options override the settings: ``concurrency``, ``batch_size``, ``lease_seconds``,
        ``poll_interval``, ``worker_id``. Returns how many step threads had not returned when the
        worker stopped (steps that hang: the process may want to exit without waiting for them).
        """
        from orchestrator.worker import Worker

        worker = Worker(self, **options)
        worker.run(drain=not wait)
        return worker.threads_left

    # Internals shared with the worker

    def saga_class(self, saga: SagaRef) -> type[Saga[Any]]:
        """The registered saga class for a class or a name."""
        name = saga if isinstance(saga, str) else getattr(saga, "name", None)
        found = self.sagas.get(name) if isinstance(name, str) else None
        if found is None or (not isinstance(saga, str) and found is not saga):
            known = ", ".join(sorted(self.sagas)) or "none"
            raise UnknownSaga(f"unknown saga {saga!r}; registered sagas: {known}")
        return found

    def validate_input(self, saga: type[Saga[Any]], data: BaseModel | dict[str, Any]) -> dict[str, Any]:
        """The input as JSON-native data, after validation by the saga's input model.

        What the model accepts must come back from storage as it went in: a NUL character,
        a NaN, an integer beyond 64 bits, or an input over ``max_input_bytes`` is refused here.
        """
        model = saga.input_model
        try:
            if isinstance(data, model):
                valid = data
            elif isinstance(data, BaseModel):
                valid = model.model_validate(data.model_dump())
            elif isinstance(data, dict):
                valid = model.model_validate(data)
            else:
                raise InvalidInput(f"{saga.name} takes a {model.__name__} or a dict as input, not {short(data)}")
        except ValidationError as error:
            raise InvalidInput(f"invalid input for {saga.name}: {one_line(error)}") from None
        if reason := unstorable(valid):
            raise InvalidInput(f"invalid input for {saga.name}: {reason}")
        payload = valid.model_dump(mode="json")
        # Serialisers (enums, extra fields, custom ones) may produce text the model itself did not hold.
        if reason := unstorable(payload):
            raise InvalidInput(f"invalid input for {saga.name}: {reason}")
        encode(payload, f"the input of {saga.name}", self.settings.max_input_bytes)
        try:  # what is stored must load again, or every later step would fail on it
            model.model_validate(payload)
        except ValidationError as error:
            raise InvalidInput(
                f"invalid input for {saga.name}: it does not survive storage as JSON: {one_line(error)}"
            ) from None
        return payload

    def _payload(self, data: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, BaseModel | dict):
            raise InvalidInput(f"event data is a dict or a pydantic model, not {short(data)}")
        if reason := unstorable(data):
            raise InvalidInput(f"event data cannot be stored: {reason}")
        try:
            dumped: dict[str, Any] = (
                data.model_dump(mode="json")
                if isinstance(data, BaseModel)
                else JSON_OBJECT.dump_python(data, mode="json")
            )
        except Exception as error:
            raise InvalidInput(f"event data must be JSON-compatible: {one_line(error)}") from None
        if reason := unstorable(dumped):
            raise InvalidInput(f"event data cannot be stored: {reason}")
        encode(dumped, "the event data", self.settings.max_input_bytes)
        return dumped

    @contextmanager
    def translating(self, doing: str) -> Iterator[None]:
        """Turn a database error met while ``doing`` something into a ``StorageError`` (one line)."""
        try:
            yield
        except (IntegrityError, OrchestratorError):
            raise
        except PersistenceError as error:
            raise storage_error(error, self.database, doing) from error

    def save(self, aggregates: builtins.list[SagaAggregate], *, wake: bool = True) -> None:
        """Record the aggregates' pending events with their index rows, in one transaction.

        ``wake`` tells this process's workers that there may be work for them.
        """
        self.store.save_sagas(aggregates, [index_entry(a) for a in aggregates])
        if wake:
            self.wake_workers()

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever this process records events (a worker in this process listens)."""
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""
        self._wakers.remove(wake)

    def wake_workers(self) -> None:
        """Tell this process's workers to look for due work now."""
        for wake in builtins.list(self._wakers):
            wake()

    def load(self, saga_uuid: Any) -> SagaAggregate:
        """The current aggregate of a saga, by aggregate id."""
        aggregate: SagaAggregate = self.store.repository.get(saga_uuid)
        return aggregate

    def fold(self, records: Iterable[StoredEvent]) -> dict[UUID, SagaAggregate]:
        """Aggregates rebuilt from stored events (ordered by saga, then version)."""
        store = self.store
        aggregates: dict[UUID, SagaAggregate] = {}
        for record in records:
            event: Any = store.mapper.to_domain_event(record)
            uuid = event.originator_id
            aggregates[uuid] = event.mutate(aggregates.get(uuid))
        return aggregates

    def fold_each(
        self, records: Iterable[StoredEvent]
    ) -> tuple[dict[UUID, SagaAggregate], dict[UUID, tuple[int, str]]]:
        """Like ``fold``, one saga at a time: a history that cannot be loaded (an event that no longer
        validates, a topic no longer known) is reported with its last version, and the rest still load."""
        groups: dict[UUID, builtins.list[StoredEvent]] = {}
        for record in records:
            groups.setdefault(UUID(str(record.originator_id)), []).append(record)
        mapper = self.store.mapper
        loaded: dict[UUID, SagaAggregate] = {}
        broken: dict[UUID, tuple[int, str]] = {}
        for uuid, history in groups.items():
            try:
                aggregate: Any = None
                for record in history:
                    event: Any = mapper.to_domain_event(record)
                    aggregate = event.mutate(aggregate)
                loaded[uuid] = aggregate
            except Exception as error:
                reason = " ".join(str(error).split())[:300]
                broken[uuid] = (
                    history[-1].originator_version,
                    f"its history cannot be loaded: {type(error).__name__}: {reason}",
                )
        return loaded, broken

    def _load(self, saga_id: str) -> SagaAggregate:
        from eventsourcing.application import AggregateNotFoundError

        try:
            with self.translating("loading a saga"):
                return self.load(aggregate_id(saga_id))
        except AggregateNotFoundError:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None

    def _command(self, saga_id: str, command: Any) -> None:
        check_saga_id(saga_id)
        for _ in range(COMMAND_RETRIES):
            aggregate = self._load(saga_id)
            command(aggregate)
            if not aggregate.pending_events:
                return
            try:
                with self.translating("recording a command"):
                    self.save([aggregate])
                return
            except IntegrityError:
                continue  # a worker recorded something meanwhile: reload and decide again
        raise OrchestratorError(f"saga {short(saga_id)} changed {COMMAND_RETRIES} times while recording; try again")


def _why_unexpected(saga_id: str, state: SagaState, event: str, aggregate: SagaAggregate) -> str:
    run = aggregate.run
    saga, name = short(saga_id), short(event)
    if state.terminal:
        return f"saga {saga} is {state.value}: it takes no more events"
    if event in run.received:
        return f"saga {saga} already received {name}"
    if run.compensating:
        return f"saga {saga} is compensating: it no longer waits for {name}"
    waits = [node.plan.event for node in run.nodes[run.cursor :] if node.plan.event]
    return f"saga {saga} does not wait for {name} (it still waits for: {', '.join(waits) or 'nothing'})"


def one_line(error: BaseException) -> str:
    """An error's message on one line (pydantic's span several), cut to a readable length."""
    text = clean_error(" ".join(str(error).split()))
    return text if len(text) <= 500 else text[:499] + "…"
