"""The eventsourcing application that stores every saga's events, how it is opened, and the one
place where database errors become the engine's errors."""

from __future__ import annotations

import sqlite3
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import ApplicationRecorder, DataError, IntegrityError, Mapper, PersistenceError

from orchestrator.errors import OrchestratorError, StorageError, StorageUnavailable
from orchestrator.events import PydanticMapper
from orchestrator.safety import escape, redact_in
from orchestrator.storage.ports import APPLICATION_NAME, IndexEntry, SagaIndex
from orchestrator.storage.urls import Database


class SagaApplication(Application[UUID]):
    """Stores the sagas' events (pydantic, as plain JSON) with their index rows."""

    name = APPLICATION_NAME

    def construct_mapper(self) -> Mapper[UUID]:
        return PydanticMapper(transcoder=self.construct_transcoder())

    def construct_recorder(self) -> ApplicationRecorder:
        # The POPO factory ignores APPLICATION_RECORDER_TOPIC; the others honour it.
        if self.env.get("PERSISTENCE_MODULE") == "eventsourcing.popo":
            from orchestrator.storage.memory import MemoryRecorder

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
        """The recorder, as the saga index it also is."""
        recorder = self.recorder
        if not isinstance(recorder, SagaIndex):  # pragma: no cover - a recorder topic set by hand
            raise TypeError(f"{type(recorder).__name__} does not implement SagaIndex")
        return recorder


def open_store(database: Database) -> SagaApplication:
    """Open the application (creating or migrating the schema if needed, idempotently).

    Raises ``StorageUnavailable`` when the database cannot be reached now (try again later),
    ``StorageError`` when it refuses (read-only, wrong credentials, not a database).
    """
    try:
        if database.is_postgres:
            from orchestrator.storage.postgres import create_schema

            create_schema(database.env)
        return SagaApplication(env=dict(database.env))
    except OrchestratorError:
        raise
    except Exception as error:
        raise storage_error(error, database, f"cannot open the database {database.url}") from error


def storage_error(error: BaseException, database: Database, doing: str) -> StorageError:
    """The engine's error for a database error met while ``doing`` something: one line, no secret.

    The database's condition (see ``is_transient``) is ``StorageUnavailable``, anything else a
    ``StorageError``.
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
