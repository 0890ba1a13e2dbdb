"""The sagas' data layer: load and fold histories, save them with their index rows, and the one
loop that records a change to one saga (reload and decide again on a conflict), used by commands
and workers alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError, PersistenceError, StoredEvent

from orchestrator.aggregate import SagaAggregate
from orchestrator.commits import GroupCommit
from orchestrator.errors import OrchestratorError, SagaNotFound
from orchestrator.events import SagaEvent
from orchestrator.readmodels.status import index_entry
from orchestrator.storage import (
    Database,
    IndexEntry,
    SagaApplication,
    SagaIndex,
    is_transient,
    open_store,
    storage_error,
)

T = TypeVar("T")
CONFLICT_TRIES = 8
"""Loads and decisions one change gets before ``Conflicted``: others kept writing to the saga."""


class HistoryUnloadable(OrchestratorError):
    """A saga's stored history no longer loads with this code (an event that no longer validates)."""

    def __init__(self, version: int, problem: str) -> None:
        super().__init__(problem)
        self.version = version
        self.problem = problem


class Conflicted(OrchestratorError):
    """A change to a saga kept meeting newer events written by others; try again."""

    def __init__(self, version: int, tries: int) -> None:
        super().__init__(f"the saga changed {tries} times while recording; try again")
        self.version = version


@dataclass(frozen=True)
class Update(Generic[T]):
    """What a recorded change did: the saga afterwards, what the change returned, its new events."""

    aggregate: SagaAggregate
    result: T
    events: list[Any]
    """The events recorded (none if the change decided nothing)."""


class Repository:
    """Loads and saves sagas in one database; opened on first use, closed by ``close``."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._store: SagaApplication | None = None
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []
        self.commits = GroupCommit(self._write)
        """Commands of this process (starts, sends, cancels...) that arrive together share a transaction."""

    def open(self) -> SagaApplication:
        """The application, opened (and the schema created or migrated) if it is not yet."""
        with self._lock:
            if self._store is None:
                self._store = open_store(self.database)
            return self._store

    def close(self) -> None:
        """Close the database connections."""
        self.commits.close()
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    @property
    def store(self) -> SagaApplication:
        """The eventsourcing application, opened on first use."""
        return self._store or self.open()

    @property
    def index(self) -> SagaIndex:
        """The work and status tables."""
        return self.store.index

    @contextmanager
    def translating(self, doing: str) -> Iterator[None]:
        """Turn a database error met while ``doing`` something into a ``StorageError`` (one line)."""
        try:
            yield
        except (IntegrityError, OrchestratorError):
            raise
        except PersistenceError as error:
            raise storage_error(error, self.database, doing) from error

    # Reading

    def events(self, saga_uuid: UUID) -> list[SagaEvent]:
        """A saga's events in order (none if it was never started)."""
        store = self.store
        events: list[SagaEvent] = []
        for record in store.recorder.select_events(saga_uuid):
            event: Any = store.mapper.to_domain_event(record)
            events.append(event)
        return events

    def fold_each(
        self, records: Iterable[StoredEvent]
    ) -> tuple[dict[UUID, SagaAggregate], dict[UUID, tuple[int, str]]]:
        """Aggregates rebuilt from stored events (ordered by saga, then version), one saga at a time:
        a history that cannot be loaded is reported with its last version, and the rest still load."""
        groups: dict[UUID, list[StoredEvent]] = {}
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
                problem = f"its history cannot be loaded: {type(error).__name__}: {reason}"
                broken[uuid] = (history[-1].originator_version, problem)
        return loaded, broken

    def load_many(self, saga_uuids: list[UUID]) -> tuple[dict[UUID, SagaAggregate], dict[UUID, tuple[int, str]]]:
        """The current aggregates of many sagas in one query (``fold_each`` of their events)."""
        return self.fold_each(self.index.select_events_many(saga_uuids)) if saga_uuids else ({}, {})

    def load(self, saga_uuid: UUID) -> SagaAggregate:
        """The current aggregate of one saga; ``SagaNotFound`` or ``HistoryUnloadable`` if there is none."""
        loaded, broken = self.load_many([saga_uuid])
        if saga_uuid in broken:
            raise HistoryUnloadable(*broken[saga_uuid])
        if saga_uuid not in loaded:
            raise SagaNotFound(f"no saga with aggregate id {saga_uuid}")
        return loaded[saga_uuid]

    # Writing

    def save(self, aggregates: list[SagaAggregate], *, wake: bool = True, group: bool = False) -> None:
        """Record the aggregates' pending events with their index rows, in one transaction.

        ``group``: a command's save, written together with the other commands of this process that
        arrive while a transaction is in flight (``commits``); it still returns once durable, and
        raises only its own error. ``wake`` tells this process's workers that there may be work.
        """
        if group:
            self.commits.save(aggregates)
        else:
            self.store.save_sagas(aggregates, [index_entry(a) for a in aggregates])
        if wake:
            self.wake_workers()

    def stored(self, aggregates: list[SagaAggregate]) -> tuple[list[StoredEvent], list[IndexEntry]]:
        """The aggregates' pending events as the store would write them, with their index rows
        (for a backend that writes them in a transaction of its own, ``claim_recorded``)."""
        mapper = self.store.mapper
        events = [mapper.to_stored_event(event) for a in aggregates for event in a.pending_events]
        return events, [index_entry(a) for a in aggregates]

    async def save_async(self, aggregates: list[SagaAggregate], *, wake: bool = True) -> None:
        """``save(aggregates, group=True)`` for a coroutine: the event loop is not blocked."""
        await self.commits.save_async(aggregates)
        if wake:
            self.wake_workers()

    def _write(self, aggregates: list[SagaAggregate]) -> None:
        # The events stay pending until they are durable: a group that fails is written again,
        # call by call, from the same aggregates.
        events = [event for aggregate in aggregates for event in aggregate.pending_events]
        self.store.events.put(events, index=[index_entry(a) for a in aggregates])
        for aggregate in aggregates:
            aggregate.pending_events.clear()

    def update(
        self,
        saga_uuid: UUID,
        change: Callable[[SagaAggregate], T],
        *,
        tries: int = CONFLICT_TRIES,
        outages: int = 0,
        wake: bool = True,
        group: bool = False,
    ) -> Update[T]:
        """Load the saga, apply ``change`` and save what it recorded; on a conflict, again from a fresh load.

        A conflict also follows a save that landed although its acknowledgement was lost: the
        reload shows it, and ``change`` decides from there. Up to ``outages`` transient storage
        errors are waited out (0.2 s, doubling); more, and the error is raised, as is anything the
        change raises and any error of the data itself.
        """
        waited = 0
        version = 0
        for _ in range(tries):
            aggregate = self.load(saga_uuid)
            version = aggregate.version
            result = change(aggregate)
            if not aggregate.pending_events:
                return Update(aggregate, result, [])
            events = list(aggregate.pending_events)
            try:
                self.save([aggregate], wake=wake, group=group)
                return Update(aggregate, result, events)
            except IntegrityError:
                continue
            except PersistenceError as error:
                if not is_transient(error) or waited >= outages:
                    raise
                waited += 1
                time.sleep(0.1 * 2**waited)
        raise Conflicted(version, tries)

    # Wake-ups within this process

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever this process records events (a worker in this process listens)."""
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake``."""
        self._wakers.remove(wake)

    def wake_workers(self) -> None:
        """Tell this process's workers to look for due work now."""
        for wake in list(self._wakers):
            wake()
