"""Storage port: the eventsourcing application, the database URL, and the saga index.

The index is two tables written in the same transaction as the events (through the
recorders' insert hook): ``saga_work`` (what is runnable and when: every timer is a
``due_at``) and ``saga_status`` (the status read model, with a tracking position).
``memory.py``, ``sqlite.py`` and ``postgres.py`` implement it; this module chooses.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit
from uuid import UUID

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import (
    ApplicationRecorder,
    DataError,
    IntegrityError,
    Mapper,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.utils import get_topic

from orchestrator import safety
from orchestrator.errors import ConfigurationError, OrchestratorError, StorageError, StorageUnavailable
from orchestrator.events import PydanticMapper
from orchestrator.safety import escape, redact_in, short

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

    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        """Put a claimed saga that cannot be loaded or saved aside: its row is due again after a
        growing delay, its status shows ``problem``; ``None`` if the row has moved on meanwhile."""

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


def set_aside_delay(failures: int) -> timedelta:
    """How long a saga that could not be loaded or saved rests before the next try: 5 s, doubling, up to 1 h."""
    return timedelta(seconds=min(5.0 * 2 ** min(failures - 1, 20), 3600.0))


def with_problem(doc: bytes, problem: str | None) -> bytes:
    """A status document with the reason its saga is set aside, if it is."""
    if problem is None:
        return doc
    return orjson.dumps({**orjson.loads(doc), "problem": problem})


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
    """A parsed ``SAGA_DATABASE_URL``; its repr and ``url`` carry no password."""

    url: str
    """The URL with its password replaced by ``***``: safe to print."""
    kind: str
    env: dict[str, str] = field(repr=False)

    @property
    def is_postgres(self) -> bool:
        """Whether the backend is PostgreSQL."""
        return self.kind == "postgresql"

    @property
    def durable(self) -> bool:
        """Whether what is written outlives the process (not so for ``memory://``)."""
        return self.kind != "memory"

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed (the password), for scrubbing error texts."""
        return [self.env.get("POSTGRES_PASSWORD", "")]


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Query parameters of a postgresql:// URL: (library setting, check, default).
_PG_OPTIONS: dict[str, tuple[str, Callable[[str], bool], str]] = {
    "schema": ("POSTGRES_SCHEMA", lambda v: _IDENTIFIER.fullmatch(v) is not None, "public"),
    "pool_size": ("POSTGRES_POOL_SIZE", lambda v: v.isdigit() and int(v) >= 1, "2"),
    "max_overflow": ("POSTGRES_MAX_OVERFLOW", lambda v: v.isdigit(), "4"),
    # Never wait forever for the events table lock; a stuck writer surfaces as an error.
    "lock_timeout": ("POSTGRES_LOCK_TIMEOUT", lambda v: v.isdigit() and int(v) >= 1, "10"),
    "connect_timeout": ("POSTGRES_CONNECT_TIMEOUT", lambda v: v.isdigit() and int(v) >= 1, "10"),
}
_PG_RULES = {
    "schema": "a SQL identifier (letters, digits, _)",
    "pool_size": "an integer of at least 1",
    "max_overflow": "an integer of at least 0",
    "lock_timeout": "whole seconds, at least 1",
    "connect_timeout": "whole seconds, at least 1",
}


def parse_database_url(url: str | None) -> Database:
    """Turn ``sqlite:///path``, ``postgresql://...`` or ``memory://`` into library settings."""
    url = url or DEFAULT_DATABASE_URL
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ConfigurationError(f"cannot parse the database URL {escape(short(shown))}: {error}") from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return Database(shown, "memory", {"PERSISTENCE_MODULE": "eventsourcing.popo"})
    if scheme == "sqlite":
        # As in SQLAlchemy: sqlite:///relative/path.db and sqlite:////absolute/path.db.
        if not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(f"SQLite URLs look like sqlite:///sagaworks.db, not {escape(short(shown))}")
        path = unquote(url[len("sqlite:///") :].split("?")[0])
        if not path:
            raise ConfigurationError(
                f"SQLite URL without a file path: {escape(short(shown))} (try sqlite:///sagaworks.db)"
            )
        if not Path(path).parent.exists():
            raise ConfigurationError(f"the directory of the SQLite file {escape(short(path))} does not exist")
        from orchestrator.sqlite import SQLiteIndexRecorder

        return Database(
            shown,
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
            raise ConfigurationError(f"PostgreSQL URL without a database name: {escape(short(shown))}")
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(parts.path.strip("/")),
            "POSTGRES_HOST": unquote(parts.hostname or "localhost"),
            "POSTGRES_PORT": str(port or 5432),
            "POSTGRES_USER": unquote(parts.username or os.environ.get("PGUSER", "postgres")),
            "POSTGRES_PASSWORD": unquote(parts.password or os.environ.get("PGPASSWORD", "")),
            "POSTGRES_PRE_PING": "n",
            # Tables are created once, under an advisory lock (see postgres.py), never by each pool.
            "CREATE_TABLE": "n",
        }
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(_PG_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown parameter {escape(short(unknown[0]))} in the database URL; known: {', '.join(_PG_OPTIONS)}"
            )
        for key, (setting, valid, default) in _PG_OPTIONS.items():
            value = query.get(key, default)
            if not valid(value):
                raise ConfigurationError(
                    f"database URL parameter {key}={escape(short(value))}: must be {_PG_RULES[key]}"
                )
            env[setting] = value
        from orchestrator.postgres import PostgresIndexRecorder

        env["APPLICATION_RECORDER_TOPIC"] = get_topic(PostgresIndexRecorder)
        return Database(shown, "postgresql", env)
    raise ConfigurationError(
        f"unsupported database URL {escape(short(shown))}: use sqlite:///path, postgresql://user@host/db or memory://"
    )


def open_store(database: Database) -> EventStore:
    """Open the event store (creating the schema if needed, idempotently).

    Raises ``StorageUnavailable`` when the database cannot be reached now (try again later),
    ``StorageError`` when it refuses (read-only, wrong credentials, not a database).
    """
    try:
        if database.is_postgres:
            from orchestrator.postgres import create_schema

            create_schema(database.env)
        return EventStore(env=dict(database.env))
    except OrchestratorError:
        raise
    except Exception as error:
        raise storage_error(error, database, f"cannot open the database {database.url}") from error


def storage_error(error: BaseException, database: Database, doing: str) -> StorageError:
    """The engine's error for a database error met while ``doing`` something: one line, no secret.

    The one place where database errors are translated: a connection that fails or a lock that
    times out is ``StorageUnavailable`` (transient), anything else a ``StorageError``.
    """
    if isinstance(error, StorageError):
        return error
    text = redact_in(" ".join(str(error).split()) or type(error).__name__, database.secrets)
    cls = StorageUnavailable if is_transient(error) else StorageError
    return cls(f"{doing}: {escape(text)}")


def is_transient(error: BaseException) -> bool:
    """Whether an error is about the database's condition rather than the data being written.

    A lost connection, a lock or pool timeout, a read-only or full database, a standby after a
    failover: everyone's writes fail alike, so a worker backs off and tries again. Only a value
    the database refuses or a broken constraint (and any error raised before the database was
    reached) belongs to the sagas being written, and is dealt with one saga at a time.
    """
    if isinstance(error, StorageError):
        return error.transient
    if not isinstance(error, PersistenceError | sqlite3.Error):
        return False
    if isinstance(error, DataError | IntegrityError | sqlite3.DataError | sqlite3.IntegrityError):
        return False
    # The library keeps the driver's error as the cause; SQLSTATE class 22 is "data exception".
    sqlstate = getattr(error.__cause__, "sqlstate", None)
    return not (isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23"))


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return safety.redact(url)
