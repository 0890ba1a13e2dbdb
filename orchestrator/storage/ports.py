"""The storage port: what the engine asks of a backend besides storing events.

The index is written in the same transaction as the events (through the recorders' insert
hook): ``saga_work`` says what is runnable and when (every timer is a ``due_at``),
``saga_status`` is the status read model, with the tracking position of the last event it
includes. Each backend's recorder inherits ``SagaIndex``, so mypy checks it implements it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import orjson
from eventsourcing.persistence import StoredEvent, Tracking

APPLICATION_NAME = "orchestrator"
"""The eventsourcing application's name: its events table, NOTIFY channel and tracking rows."""


@dataclass(frozen=True)
class IndexEntry:
    """A saga's rows in the index, derived from its aggregate at ``version``."""

    saga_uuid: UUID
    saga_id: str
    saga: str
    state: str
    version: int
    due_at: datetime | None
    """When the saga next needs a worker; ``None`` removes it from the work table."""
    created_at: datetime
    updated_at: datetime
    doc: bytes
    """The ``SagaStatus`` as JSON."""
    search: bytes | None = None
    """The saga's searchable input fields as a JSON object (written once, with the first row)."""
    pool: str | None = None
    """The pool whose slot it waits for or holds (``None``: none; also once it ended)."""
    pool_key: str = ""
    queued: bool = False
    """Waiting for a slot (``True``) or holding one."""
    pool_due: datetime | None = None
    """When a queued saga may be admitted (its ``start_at``, or its start)."""


@dataclass(frozen=True)
class StatusQuery:
    """Which status rows to list or count; every filter is optional."""

    state: str | None = None
    saga: str | None = None
    created_after: datetime | None = None
    """Created at or after this time."""
    created_before: datetime | None = None
    """Created before this time."""
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    search: dict[str, Any] = field(default_factory=dict)
    """Searchable input fields that must equal these values."""
    after: tuple[datetime, UUID] | None = None
    """Keyset paging: only rows that come after this (updated_at, saga_uuid) in the list's order."""


@dataclass(frozen=True)
class Delivery:
    """A completion notification: what to send where, and how its attempts went."""

    delivery_id: UUID
    saga_uuid: UUID
    saga_id: str
    saga: str
    kind: str
    """``url`` (a signed POST to ``target``) or ``hook`` (the saga class's ``on_finished``)."""
    target: str
    body: bytes
    """The final ``SagaStatus`` as JSON: what is sent."""
    attempts: int = 0
    log: tuple[dict[str, Any], ...] = ()
    """One entry per attempt: started_at, ended_at, worker, outcome, error."""


@dataclass(frozen=True)
class Claim:
    """A work row leased by a worker: the saga and the version its row was written at."""

    saga_uuid: UUID
    version: int


RecordClaimed = Callable[[list[Claim], list[StoredEvent]], tuple[list[StoredEvent], list[IndexEntry]]]
"""What a worker makes of the sagas it claimed: their new events and index rows (``claim_recorded``)."""


class Waker(Protocol):
    """Sets a worker's wake-up event when another process records events."""

    def start(self) -> None:
        """Start watching in the background."""

    def stop(self) -> None:
        """Stop watching."""


class ThreadWaker:
    """A ``Waker`` that watches in a daemon thread until stopped; subclasses write ``watch_once``.

    A watch that fails (the connection dropped, the file went away) wakes the worker, so that
    polling covers the gap, and starts again a second later: it never stops for good.
    """

    name = "saga-waker"
    errors: tuple[type[BaseException], ...] = (Exception,)
    retry_pause = 1.0
    """Seconds between a failed watch and the next."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, name=self.name, daemon=True)

    def start(self) -> None:
        """Start watching in the background."""
        self.thread.start()

    def stop(self) -> None:
        """Stop watching (the watch loop checks ``stopping`` at least every fraction of a second)."""
        self.stopping.set()
        self.thread.join(timeout=5)

    def watch(self) -> None:
        """Run ``watch_once`` until stopped, again after each failure."""
        while not self.stopping.is_set():
            try:
                self.watch_once()
            except self.errors:
                self.wake()
                self.stopping.wait(self.retry_pause)

    def watch_once(self) -> None:
        """Call ``self.wake()`` on news until ``self.stopping`` is set or the watch fails."""
        raise NotImplementedError


class SagaIndex(ABC):
    """The work and status tables of one backend (implemented by its recorder)."""

    @abstractmethod
    def waker(self, wake: Callable[[], None]) -> Waker | None:
        """What wakes a worker when another process writes (``None``: only polling can)."""

    @abstractmethod
    def claim(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Claim]:
        """Lease up to ``limit`` due, unleased work rows to ``owner``, earliest due first."""

    def claim_loaded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> tuple[list[Claim], list[StoredEvent]]:
        """``claim``, with the claimed sagas' events (a backend may do both in one round trip)."""
        claims = self.claim(owner, now, lease_until, limit)
        return claims, self.select_events_many([claim.saga_uuid for claim in claims])

    claims_with_save: bool = False
    """Whether ``claim_recorded`` is available: a claim and the save it leads to in one transaction."""

    def claim_recorded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int, record: RecordClaimed
    ) -> tuple[list[Claim], list[StoredEvent]] | None:
        """``claim_loaded``, then the events and index rows ``record`` makes of what it claimed,
        written in the same transaction (``None``); anything raised undoes it all, the claim
        included. A backend that cannot write them now commits the claim alone and returns it
        (as ``claim_loaded`` would), for the caller to save apart."""
        raise NotImplementedError(f"{type(self).__name__} claims and saves in two transactions")

    @abstractmethod
    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        """Drop a lease that led to no event, setting the row's ``due_at`` (``None``: remove it)."""

    @abstractmethod
    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        """Rest a claimed saga that cannot be loaded or saved: its row is due again after a growing
        delay, its status shows ``problem``; ``None`` if the row has moved on meanwhile."""

    @abstractmethod
    def next_due(self) -> datetime | None:
        """The earliest time any saga needs a worker."""

    @abstractmethod
    def get_status(self, saga_uuid: UUID) -> bytes | None:
        """The status document of a saga, if it was started."""

    @abstractmethod
    def list_status(self, query: StatusQuery, limit: int) -> list[bytes]:
        """Status documents matching ``query``, most recently updated first (then by saga key)."""

    @abstractmethod
    def count_status(self, query: StatusQuery) -> list[tuple[str, str, int]]:
        """How many sagas match ``query``, as (saga name, state, count) rows."""

    @abstractmethod
    def select_events_many(self, saga_uuids: list[UUID], *, first_only: bool = False) -> list[StoredEvent]:
        """The stored events of many sagas in one query, ordered by saga then version (with
        ``first_only``, only each saga's first event)."""

    @abstractmethod
    def status_position(self) -> int | None:
        """The tracking position of the status read model (last notification it includes)."""

    @abstractmethod
    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        """Upsert status rows (and the tracking position) outside an event save; ``reset`` empties first.

        A row is never replaced by one of an earlier version (an equal one may be rewritten).
        """

    # Followers of the event log: each write goes with the follower's tracking record, in one
    # transaction (the library's tracking table: a high-water mark per follower name).

    @abstractmethod
    def tracked(self, name: str) -> int | None:
        """The last notification the follower ``name`` has processed."""

    @abstractmethod
    def advance(self, tracking: Tracking) -> None:
        """Record that a follower has passed ``tracking`` with nothing to write (``IntegrityError``
        if it already had)."""

    @abstractmethod
    def write_rows(self, projection: str, rows: dict[str, bytes | None], tracking: Tracking) -> None:
        """Put (``None``: delete) a projection's rows, with its tracking record, in one transaction."""

    @abstractmethod
    def purge_candidates(self, state: str, before: datetime, safe: int | None, limit: int) -> list[UUID]:
        """Sagas in ``state`` last updated before ``before``, with no notification left to deliver, oldest
        first; with ``safe``, only those whose last event is at or before that position of the log."""

    @abstractmethod
    def purge(self, saga_uuids: list[UUID], *, histories: bool) -> None:
        """Remove sagas from the read models (status, work, deliveries) and, with ``histories``, their
        events, in one transaction."""

    @abstractmethod
    def tracking_positions(self) -> dict[str, int]:
        """Every follower's tracked position, by tracking name."""

    @abstractmethod
    def pool_running(self, pool: str) -> dict[str, int]:
        """The admitted sagas of ``pool`` that have not ended, counted per key."""

    @abstractmethod
    def pool_waiting(self, pool: str, limit: int, now: datetime, full: list[str]) -> list[tuple[UUID, str]]:
        """Up to ``limit`` queued sagas of ``pool`` that may start by ``now``, of no key in ``full``,
        oldest first: (aggregate id, key)."""

    @abstractmethod
    def pool_queued(self) -> list[str]:
        """The pools that have sagas waiting."""

    @abstractmethod
    def read_rows(self, projection: str, keys: list[str] | None = None) -> dict[str, bytes]:
        """A projection's rows by key (all of them when ``keys`` is ``None``)."""

    @abstractmethod
    def reset_follower(self, name: str, projection: str | None = None) -> None:
        """Forget a follower's position (and a projection's rows), for a rebuild from the start."""

    @abstractmethod
    def add_deliveries(self, deliveries: list[Delivery], due_at: datetime, tracking: Tracking) -> None:
        """Queue notifications (one already queued for its saga and target is kept), with tracking."""

    @abstractmethod
    def claim_deliveries(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Delivery]:
        """Lease up to ``limit`` notifications that are due."""

    @abstractmethod
    def finish_delivery(
        self,
        delivery: Delivery,
        owner: str,
        *,
        due_at: datetime | None,
        delivered_at: datetime | None,
        error: str | None,
    ) -> None:
        """Record an attempt (``delivery.log`` has it last): delivered, due again at ``due_at``, or given up."""

    @abstractmethod
    def deliveries_of(self, saga_uuid: UUID) -> list[Delivery]:
        """The notifications of one saga, with their attempts."""


def set_aside_delay(failures: int) -> timedelta:
    """How long a saga that could not be loaded or saved rests before the next try: 5 s, doubling, up to 1 h."""
    return timedelta(seconds=min(5.0 * 2 ** min(failures - 1, 20), 3600.0))


def with_problem(doc: bytes, problem: str | None) -> bytes:
    """A status document with the reason its saga is set aside, if it is."""
    if problem is None:
        return doc
    return orjson.dumps({**orjson.loads(doc), "problem": problem})
