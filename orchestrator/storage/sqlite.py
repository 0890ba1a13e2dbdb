"""The SQLite backend: the embedded default (one file, WAL, one writer at a time)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import IntegrityError, OperationalError, StoredEvent, Tracking
from eventsourcing.sqlite import SQLiteCursor, SQLiteProcessRecorder

from orchestrator.storage.named import Cursor, Queries, statements
from orchestrator.storage.ports import APPLICATION_NAME, Claim, IndexEntry, ThreadWaker, Waker
from orchestrator.storage.sql import SqlIndex

QUERIES = Queries.load("sqlite")


CREATE_TRIES = 5


def _contended(error: BaseException) -> bool:
    """Whether ``error`` is another process creating the same tables at the same moment."""
    text = str(error).lower()
    return isinstance(error, IntegrityError) or "locked" in text or "already exists" in text


class SQLiteIndexRecorder(SqlIndex, SQLiteProcessRecorder):
    """SQLite recorder that writes the work and status rows in the events' transaction, and the
    tracking records of the log's followers (the library's process recorder: events + tracking)."""

    queries = QUERIES
    last_own_id = 0
    """The last event id this process wrote (so a watcher can tell its own commits from others')."""

    # Schema

    def create_table(self) -> None:
        # The library creates its tables (and records its own migration) in a deferred transaction:
        # two processes opening a new file at once can collide; the loser finds them made on a retry.
        for attempt in range(CREATE_TRIES):
            try:
                super().create_table()
                break
            except (IntegrityError, OperationalError) as error:
                if attempt == CREATE_TRIES - 1 or not _contended(error):
                    raise
                time.sleep(0.05 * (attempt + 1))
        if self._schema_version() < len(QUERIES.migrations):
            self._migrate()

    def _schema_version(self) -> int:
        with self.transaction(commit=False) as cursor:
            if not self.rows(cursor, "has_schema_table"):
                return 0
            ((version,),) = self.rows(cursor, "schema_version")
        return int(version or 0)

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the file's write lock before reading the version (waiting for it
        # like any writer), so processes opening one file at once migrate one after the other; a
        # deferred transaction that read first could not upgrade to a write if another committed.
        conn = sqlite3.connect(self.datastore.pool.db_name, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS saga_schema (version INTEGER)")
            row = conn.execute("SELECT max(version) FROM saga_schema").fetchone()
            for statement in statements(QUERIES.migrations, int(row[0] or 0) if row else 0):
                conn.execute(statement)
            conn.execute("DELETE FROM saga_schema")
            conn.execute("INSERT INTO saga_schema VALUES (?)", (len(QUERIES.migrations),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    # The dialect

    @contextmanager
    def transaction(self, *, commit: bool) -> Iterator[Cursor]:
        with self.datastore.transaction(commit=commit) as cursor:
            yield cursor

    def query(self, name: str, **fragments: str) -> Any:
        text = QUERIES.named[name]
        return text.format(events=self.events_table_name, **fragments) if "{" in text else text

    def param(self, name: str) -> str:
        return f":{name}"

    def key_list(self, keys: list[str]) -> Any:
        return orjson.dumps(keys).decode()

    def search_clause(self, search: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # Field names are identifiers (checked by the caller); values go in as JSON, so a string,
        # a number and a boolean each match only their own kind.
        clauses, params = [], {}
        for i, (name, value) in enumerate(search.items()):
            clauses.append(f"json_extract(search, '$.{name}') IS json_extract(:search_{i}, '$')")
            params[f"search_{i}"] = orjson.dumps(value).decode()
        return " AND ".join(clauses), params

    def key(self, saga_uuid: UUID) -> Any:
        return saga_uuid.hex

    def moment(self, at: datetime | None) -> Any:
        return None if at is None else at.timestamp()

    def from_moment(self, value: Any) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, UTC)

    def track(self, cursor: Cursor, tracking: Tracking) -> None:
        assert isinstance(cursor, SQLiteCursor)
        self._insert_tracking(cursor, tracking)

    def tracking_table(self) -> str:
        return "tracking"  # fixed by the library on SQLite

    def tracked(self, name: str) -> int | None:
        return self.max_tracking_id(name)

    def upsert_status(self, cursor: Cursor, entries: Sequence[IndexEntry]) -> None:
        assert isinstance(cursor, SQLiteCursor)
        cursor.executemany(self.query("upsert_status"), [self._status_row(e) for e in entries])

    def _status_row(self, entry: IndexEntry) -> dict[str, Any]:
        return {
            "saga_uuid": entry.saga_uuid.hex,
            "saga_id": entry.saga_id,
            "saga": entry.saga,
            "state": entry.state,
            "version": entry.version,
            "created_at": entry.created_at.timestamp(),
            "updated_at": entry.updated_at.timestamp(),
            "doc": entry.doc,
            "search": None if entry.search is None else entry.search.decode(),
            "pool": entry.pool,
            "pool_key": entry.pool_key,
            "queued": entry.queued,
            "pool_due": None if entry.pool_due is None else entry.pool_due.timestamp(),
        }

    # Writes in the events' transaction

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        if ids:
            self.last_own_id = max(self.last_own_id, ids[-1])
        entries: Sequence[IndexEntry] = kwargs.get("index", ())
        if entries:
            self.upsert_status(c, entries)
            dues = [
                {"saga_uuid": e.saga_uuid.hex, "due_at": e.due_at.timestamp(), "version": e.version}
                for e in entries
                if e.due_at is not None
            ]
            if dues:
                c.executemany(self.query("upsert_work"), dues)
            done = [{"saga_uuid": e.saga_uuid.hex} for e in entries if e.due_at is None]
            if done:
                c.executemany(self.query("delete_work"), done)
        if (check := kwargs.get("admission")) is not None:
            self.check_admission(c, check)
        self.put_rows(c, kwargs.get("rows", ()))
        if ids:
            self.run(c, "track", {"application": APPLICATION_NAME, "position": ids[-1]})
        return ids

    # Reads and claims

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        return DataVersionWatcher(self.datastore.pool.db_name, self.events_table_name, wake, lambda: self.last_own_id)

    def claim(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Claim]:
        params = {"owner": owner, "until": lease_until.timestamp(), "now": now.timestamp(), "limit": limit}
        with self.transaction(commit=True) as cursor:
            return [Claim(UUID(key), version) for key, version in self.rows(cursor, "claim", params)]

    def select_events_many(self, saga_uuids: list[UUID], *, first_only: bool = False) -> list[StoredEvent]:
        if not saga_uuids:
            return []
        params = {f"k{i}": uuid.hex for i, uuid in enumerate(saga_uuids)}
        query = "first_events_of" if first_only else "events_of"
        with self.transaction(commit=False) as cursor:
            rows = self.rows(cursor, query, params, keys=", ".join(f":{key}" for key in params))
        return [StoredEvent(UUID(key), version, topic, bytes(state)) for key, version, topic, state in rows]


class DataVersionWatcher(ThreadWaker):
    """Wakes a worker when another connection commits to the file (SQLite has no NOTIFY).

    ``PRAGMA data_version`` changes exactly when someone else committed a change, and reading
    it costs microseconds, so a 10 ms watch gives near-instant wake-ups across processes.
    """

    name = "saga-sqlite-watch"
    errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str,
        events_table: str,
        wake: Callable[[], None],
        last_own_id: Callable[[], int],
        interval: float = 0.01,
    ) -> None:
        super().__init__(wake)
        self.path = path
        self.head_query = f"SELECT max(rowid) FROM {events_table}"
        self.last_own_id = last_own_id
        self.interval = interval

    def watch_once(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            seen = None
            while not self.stopping.wait(self.interval):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen is not None and version != seen:
                    # This process's own pool connections change data_version too; only events
                    # beyond the last one we wrote are news (others' claims need no wake-up).
                    head = conn.execute(self.head_query).fetchone()[0] or 0
                    if head > self.last_own_id():
                        self.wake()
                seen = version
        finally:
            conn.close()
