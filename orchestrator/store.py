"""Storage port: the eventsourcing application, the database URL, and the saga index.

The index is two tables written in the same transaction as the events (through the
recorders' insert hook): ``saga_work`` (what is runnable and when: every timer is a
``due_at``) and ``saga_status`` (the status read model, with a tracking position).
``memory.py``, ``sqlite.py`` and ``postgres.py`` implement it; this module chooses.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import ApplicationRecorder, Mapper, StoredEvent
from eventsourcing.utils import get_topic

from orchestrator.errors import ConfigurationError
from orchestrator.events import PydanticMapper

DEFAULT_DATABASE_URL = "sqlite:///sagaworks.db"
APPLICATION_NAME = "orchestrator"


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


@dataclass(frozen=True)
class Claim:
    """A work row leased by a worker: the saga and the version its row was written at."""

    saga_uuid: UUID
    version: int


class Waker(Protocol):
    """Sets a worker's wake-up event when another process records events."""

    def start(self) -> None:
        """Start watching in the background."""

    def stop(self) -> None:
        """Stop watching."""


class ThreadWaker:
    """A ``Waker`` that watches in a daemon thread until stopped; subclasses write ``watch``."""

    name = "saga-waker"

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
        """Call ``self.wake()`` on news until ``self.stopping`` is set."""
        raise NotImplementedError


class SagaIndex(Protocol):
    """What the engine asks of a backend's recorder besides storing events."""

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        """What wakes a worker when another process writes (``None``: only polling can)."""

    def claim_loaded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> tuple[list[Claim], list[StoredEvent]]:
        """Lease up to ``limit`` due, unleased work rows to ``owner``; with the claimed sagas' events."""

    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        """Drop a lease that led to no event, setting the row's ``due_at``."""

    def next_due(self) -> datetime | None:
        """The earliest time any saga needs a worker."""

    def get_status(self, saga_uuid: UUID) -> bytes | None:
        """The status document of a saga, if it was started."""

    def list_status(self, state: str | None, saga: str | None, limit: int) -> list[bytes]:
        """Status documents, newest first, filtered by state and saga name."""

    def select_events_many(self, saga_uuids: list[UUID]) -> list[StoredEvent]:
        """The stored events of many sagas in one query, ordered by saga then version."""

    def status_position(self) -> int | None:
        """The tracking position of the status read model (last notification it includes)."""

    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        """Upsert status rows (and the tracking position) outside an event save; ``reset`` empties first."""


class EventStore(Application[UUID]):
    """The eventsourcing application that stores every saga's events."""

    name = APPLICATION_NAME

    def construct_mapper(self) -> Mapper[UUID]:
        return PydanticMapper(transcoder=self.construct_transcoder())

    def construct_recorder(self) -> ApplicationRecorder:
        # The POPO factory ignores APPLICATION_RECORDER_TOPIC; the others honour it.
        if self.env.get("PERSISTENCE_MODULE") == "eventsourcing.popo":
            from orchestrator.memory import MemoryRecorder

            return MemoryRecorder()
        return super().construct_recorder()

    def save_sagas(self, aggregates: list[Any], index: list[IndexEntry]) -> None:
        """Record the aggregates' pending events and their index rows in one transaction.

        Leaner than ``save()``: no protocol checks, snapshots or notification hooks, none of
        which the engine uses.
        """
        events = [event for aggregate in aggregates for event in aggregate.collect_events()]
        self.events.put(events, index=index)

    @property
    def index(self) -> SagaIndex:
        """The recorder, seen as the saga index."""
        return self.recorder  # type: ignore[return-value]


@dataclass(frozen=True)
class Database:
    """A parsed ``SAGA_DATABASE_URL``."""

    url: str
    kind: str
    env: dict[str, str]

    @property
    def is_postgres(self) -> bool:
        """Whether the backend is PostgreSQL."""
        return self.kind == "postgresql"


def parse_database_url(url: str | None) -> Database:
    """Turn ``sqlite:///path``, ``postgresql://...`` or ``memory://`` into library settings."""
    url = url or DEFAULT_DATABASE_URL
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return Database(url, "memory", {"PERSISTENCE_MODULE": "eventsourcing.popo"})
    if scheme == "sqlite":
        # As in SQLAlchemy: sqlite:///relative/path.db and sqlite:////absolute/path.db.
        if not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(f"SQLite URLs look like sqlite:///sagaworks.db, not {url!r}")
        path = unquote(url[len("sqlite:///") :].split("?")[0])
        if not path:
            raise ConfigurationError(f"SQLite URL without a file path: {url!r} (try sqlite:///sagaworks.db)")
        if not Path(path).parent.exists():
            raise ConfigurationError(f"the directory of the SQLite file {path!r} does not exist")
        from orchestrator.sqlite import SQLiteIndexRecorder

        return Database(
            url,
            "sqlite",
            {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": path,
                "SQLITE_LOCK_TIMEOUT": "30",
                "APPLICATION_RECORDER_TOPIC": get_topic(SQLiteIndexRecorder),
            },
        )
    if scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise ConfigurationError(f"PostgreSQL URL without a database name: {url!r}")
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(parts.path.strip("/")),
            "POSTGRES_HOST": parts.hostname or "localhost",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or os.environ.get("PGUSER", "postgres")),
            "POSTGRES_PASSWORD": unquote(parts.password or os.environ.get("PGPASSWORD", "")),
            "POSTGRES_SCHEMA": query.get("schema", "public"),
            "POSTGRES_POOL_SIZE": query.get("pool_size", "2"),
            "POSTGRES_MAX_OVERFLOW": query.get("max_overflow", "4"),
            # Never wait forever for the events table lock; a stuck writer surfaces as an error.
            "POSTGRES_LOCK_TIMEOUT": query.get("lock_timeout", "10"),
            "POSTGRES_CONNECT_TIMEOUT": query.get("connect_timeout", "10"),
            "POSTGRES_PRE_PING": "n",
            # Tables are created once, under an advisory lock (see postgres.py), never by each pool.
            "CREATE_TABLE": "n",
        }
        from orchestrator.postgres import PostgresIndexRecorder

        env["APPLICATION_RECORDER_TOPIC"] = get_topic(PostgresIndexRecorder)
        return Database(url, "postgresql", env)
    raise ConfigurationError(
        f"unsupported database URL {url!r}: use sqlite:///path, postgresql://user@host/db or memory://"
    )


def open_store(database: Database) -> EventStore:
    """Open the event store (creating the schema if needed, idempotently)."""
    if database.is_postgres:
        from orchestrator.postgres import create_schema

        create_schema(database.env)
    try:
        return EventStore(env=dict(database.env))
    except Exception as error:
        raise ConfigurationError(f"cannot open the database {redact(database.url)}: {error}") from error


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
