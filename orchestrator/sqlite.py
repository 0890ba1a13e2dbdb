"""The SQLite saga index: the embedded default (one file, WAL, one writer at a time)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor

from orchestrator.store import Claim, IndexEntry, ThreadWaker, Waker, set_aside_delay, with_problem

SCHEMA_V1 = [
    "CREATE TABLE IF NOT EXISTS saga_work ("
    " saga_uuid TEXT PRIMARY KEY, due_at REAL NOT NULL, version INTEGER NOT NULL,"
    " lease_owner TEXT, lease_until REAL)",
    "CREATE INDEX IF NOT EXISTS saga_work_due ON saga_work (due_at)",
    "CREATE TABLE IF NOT EXISTS saga_status ("
    " saga_uuid TEXT PRIMARY KEY, saga_id TEXT NOT NULL, saga TEXT NOT NULL, state TEXT NOT NULL,"
    " version INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, doc BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS saga_status_state ON saga_status (state, updated_at)",
    "CREATE INDEX IF NOT EXISTS saga_status_saga ON saga_status (saga, state, updated_at)",
    "CREATE INDEX IF NOT EXISTS saga_status_updated ON saga_status (updated_at)",
    "CREATE TABLE IF NOT EXISTS saga_status_tracking (application_name TEXT PRIMARY KEY, notification_id INTEGER)",
]
# Each entry brings the schema from the previous version to the next; never edit a shipped one.
MIGRATIONS: list[list[str]] = [
    SCHEMA_V1,
    [  # 2: sagas set aside after their history could not be loaded or saved
        "ALTER TABLE saga_status ADD COLUMN problem TEXT",
        "ALTER TABLE saga_work ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    ],
]

# A later version always wins over an earlier one (a rebuild may rewrite an equal one).
UPSERT_STATUS = (
    "INSERT INTO saga_status (saga_uuid, saga_id, saga, state, version, created_at, updated_at, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (saga_uuid) DO UPDATE SET"
    " state = excluded.state, version = excluded.version, updated_at = excluded.updated_at, doc = excluded.doc,"
    " problem = NULL WHERE saga_status.version <= excluded.version"
)
# Writing a row releases any lease on it: the events just saved say what is due next.
UPSERT_WORK = (
    "INSERT INTO saga_work (saga_uuid, due_at, version) VALUES (?, ?, ?) ON CONFLICT (saga_uuid) DO UPDATE SET"
    " due_at = excluded.due_at, version = excluded.version, lease_owner = NULL, lease_until = NULL, failures = 0"
)
DELETE_WORK = "DELETE FROM saga_work WHERE saga_uuid = ?"
TRACK = (
    "INSERT INTO saga_status_tracking VALUES ('orchestrator', ?) ON CONFLICT (application_name)"
    " DO UPDATE SET notification_id = excluded.notification_id"
    " WHERE saga_status_tracking.notification_id < excluded.notification_id"
)
# SQLite has no SKIP LOCKED, and needs none: the UPDATE takes the one write lock, so the
# select and the lease happen as one step for every process sharing the file.
CLAIM = (
    "UPDATE saga_work SET lease_owner = ?, lease_until = ? WHERE saga_uuid IN ("
    " SELECT saga_uuid FROM saga_work WHERE due_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
    " ORDER BY due_at LIMIT ?) RETURNING saga_uuid, version"
)


def epoch(moment: datetime) -> float:
    """Seconds since the epoch: comparable, indexable, timezone-free."""
    return moment.timestamp()


def status_params(entry: IndexEntry) -> tuple[Any, ...]:
    """The status row of an entry, in column order."""
    return (
        entry.saga_uuid.hex,
        entry.saga_id,
        entry.saga,
        entry.state,
        entry.version,
        epoch(entry.created_at),
        epoch(entry.updated_at),
        entry.doc,
    )


class SQLiteIndexRecorder(SQLiteApplicationRecorder):
    """SQLite recorder that writes the work and status rows in the events' transaction."""

    def create_table(self) -> None:
        super().create_table()
        if self._schema_version() < len(MIGRATIONS):
            self._migrate()

    def _schema_version(self) -> int:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'saga_schema'")
            if c.fetchone() is None:
                return 0
            c.execute("SELECT max(version) FROM saga_schema")
            row = c.fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE takes the file's write lock before reading the version (waiting for it
        # like any writer), so processes opening one file at once migrate one after the other; a
        # deferred transaction that read first could not upgrade to a write if another committed.
        conn = sqlite3.connect(self.datastore.pool.db_name, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS saga_schema (version INTEGER)")
            row = conn.execute("SELECT max(version) FROM saga_schema").fetchone()
            version = 0 if row is None or row[0] is None else int(row[0])
            for statement in (sql for migration in MIGRATIONS[version:] for sql in migration):
                conn.execute(statement)
            conn.execute("DELETE FROM saga_schema")
            conn.execute("INSERT INTO saga_schema VALUES (?)", (len(MIGRATIONS),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    last_own_id = 0
    """The last event id this process wrote (so a watcher can tell its own commits from others')."""

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids = super()._insert_events(c, stored_events, **kwargs)
        if ids:
            self.last_own_id = max(self.last_own_id, ids[-1])
        entries: Sequence[IndexEntry] = kwargs.get("index", ())
        if entries:
            c.executemany(UPSERT_STATUS, [status_params(e) for e in entries])
            dues = [(e.saga_uuid.hex, epoch(e.due_at), e.version) for e in entries if e.due_at is not None]
            if dues:
                c.executemany(UPSERT_WORK, dues)
            done = [(e.saga_uuid.hex,) for e in entries if e.due_at is None]
            if done:
                c.executemany(DELETE_WORK, done)
        if ids:
            c.execute(TRACK, (ids[-1],))
        return ids

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        return DataVersionWatcher(self.datastore.pool.db_name, wake, lambda: self.last_own_id)

    def claim(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Claim]:
        with self.datastore.transaction(commit=True) as c:
            c.execute(CLAIM, (owner, epoch(lease_until), epoch(now), epoch(now), limit))
            return [Claim(UUID(row[0]), row[1]) for row in c.fetchall()]

    def claim_loaded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> tuple[list[Claim], list[StoredEvent]]:
        claims = self.claim(owner, now, lease_until, limit)
        return claims, self.select_events_many([claim.saga_uuid for claim in claims])

    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        with self.datastore.transaction(commit=True) as c:
            if due_at is None:
                c.execute("DELETE FROM saga_work WHERE saga_uuid = ? AND version = ?", (saga_uuid.hex, version))
            else:
                c.execute(
                    "UPDATE saga_work SET due_at = ?, lease_owner = NULL, lease_until = NULL"
                    " WHERE saga_uuid = ? AND version = ?",
                    (epoch(due_at), saga_uuid.hex, version),
                )

    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        with self.datastore.transaction(commit=True) as c:
            # A write first: it takes the write lock at once (a read first could not upgrade to a
            # write if another connection committed in between).
            c.execute(
                "UPDATE saga_work SET failures = failures + 1 WHERE saga_uuid = ? AND version = ? RETURNING failures",
                (saga_uuid.hex, version),
            )
            row = c.fetchone()
            if row is None:
                return None  # the saga moved on meanwhile
            due_at = now + set_aside_delay(int(row[0]))
            c.execute(
                "UPDATE saga_work SET due_at = ?, lease_owner = NULL, lease_until = NULL WHERE saga_uuid = ?",
                (epoch(due_at), saga_uuid.hex),
            )
            c.execute(
                "UPDATE saga_status SET problem = ? WHERE saga_uuid = ? AND version = ?",
                (problem, saga_uuid.hex, version),
            )
        return due_at

    def next_due(self) -> datetime | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT min(max(due_at, coalesce(lease_until, due_at))) FROM saga_work")
            row = c.fetchone()
        return None if row is None or row[0] is None else datetime.fromtimestamp(row[0], UTC)

    def get_status(self, saga_uuid: UUID) -> bytes | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT doc, problem FROM saga_status WHERE saga_uuid = ?", (saga_uuid.hex,))
            row = c.fetchone()
        return None if row is None else with_problem(bytes(row[0]), row[1])

    def list_status(self, state: str | None, saga: str | None, limit: int) -> list[bytes]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if saga is not None:
            where.append("saga = ?")
            params.append(saga)
        sql = "SELECT doc, problem FROM saga_status"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC LIMIT ?"
        with self.datastore.transaction(commit=False) as c:
            c.execute(sql, (*params, limit))
            return [with_problem(bytes(row[0]), row[1]) for row in c.fetchall()]

    def status_position(self) -> int | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT notification_id FROM saga_status_tracking WHERE application_name = 'orchestrator'")
            row = c.fetchone()
        return None if row is None else int(row[0])

    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        with self.datastore.transaction(commit=True) as c:
            if reset:
                c.execute("DELETE FROM saga_status")
                c.execute("DELETE FROM saga_status_tracking")
            c.executemany(UPSERT_STATUS, [status_params(e) for e in entries])
            if position is not None:
                c.execute(TRACK, (position,))

    def select_events_many(self, saga_uuids: list[UUID]) -> list[StoredEvent]:
        if not saga_uuids:
            return []
        marks = ", ".join("?" * len(saga_uuids))
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT originator_id, originator_version, topic, state FROM {self.events_table_name}"
                f" WHERE originator_id IN ({marks}) ORDER BY originator_id, originator_version",
                [uuid.hex for uuid in saga_uuids],
            )
            return [StoredEvent(UUID(row[0]), row[1], row[2], bytes(row[3])) for row in c.fetchall()]


class DataVersionWatcher(ThreadWaker):
    """Wakes a worker when another connection commits to the file (SQLite has no NOTIFY).

    ``PRAGMA data_version`` changes exactly when someone else committed a change, and reading
    it costs microseconds, so a 10 ms watch gives near-instant wake-ups across processes.
    """

    name = "saga-sqlite-watch"

    def __init__(
        self, path: str, wake: Callable[[], None], last_own_id: Callable[[], int], interval: float = 0.01
    ) -> None:
        super().__init__(wake)
        self.path = path
        self.last_own_id = last_own_id
        self.interval = interval

    def watch(self) -> None:
        while not self.stopping.is_set():
            try:
                self._watch()
            except sqlite3.Error:
                self.wake()  # polling covers the gap; the watcher is only a shortcut
                self.stopping.wait(1.0)

    def _watch(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            seen = None
            while not self.stopping.wait(self.interval):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen is not None and version != seen:
                    # This process's own pool connections change data_version too; only events
                    # beyond the last one we wrote are news (others' claims need no wake-up).
                    head = conn.execute("SELECT max(rowid) FROM stored_events").fetchone()[0] or 0
                    if head > self.last_own_id():
                        self.wake()
                seen = version
        finally:
            conn.close()
