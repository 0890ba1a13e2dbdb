"""The PostgreSQL saga index, schema creation and LISTEN wake-ups: the only module that imports psycopg."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composed, Identifier

from orchestrator.errors import StorageError, StorageUnavailable
from orchestrator.safety import redact_in
from orchestrator.store import (
    APPLICATION_NAME,
    Claim,
    IndexEntry,
    ThreadWaker,
    Waker,
    set_aside_delay,
    with_problem,
)

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS {schema}.saga_work (
    saga_uuid uuid PRIMARY KEY,
    due_at timestamptz NOT NULL,
    version integer NOT NULL,
    lease_owner text,
    lease_until timestamptz);
CREATE INDEX IF NOT EXISTS saga_work_due ON {schema}.saga_work (due_at);
CREATE TABLE IF NOT EXISTS {schema}.saga_status (
    saga_uuid uuid PRIMARY KEY,
    saga_id text NOT NULL,
    saga text NOT NULL,
    state text NOT NULL,
    version integer NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    doc jsonb NOT NULL);
CREATE INDEX IF NOT EXISTS saga_status_state ON {schema}.saga_status (state, updated_at DESC);
CREATE INDEX IF NOT EXISTS saga_status_saga ON {schema}.saga_status (saga, state, updated_at DESC);
CREATE INDEX IF NOT EXISTS saga_status_updated ON {schema}.saga_status (updated_at DESC);
CREATE TABLE IF NOT EXISTS {schema}.saga_status_tracking (
    application_name text PRIMARY KEY,
    notification_id bigint NOT NULL);
"""
# Each entry brings the schema from the previous version to the next; never edit a shipped one.
MIGRATIONS: list[str] = [
    SCHEMA_V1,
    # 2: sagas set aside after their history could not be loaded or saved
    "ALTER TABLE {schema}.saga_status ADD COLUMN IF NOT EXISTS problem text;"
    " ALTER TABLE {schema}.saga_work ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;",
]

# Any two processes may start at once; DDL (the library's CREATE OR REPLACE FUNCTION among it)
# fails with "tuple concurrently updated" when run concurrently, so it runs under this lock.
SCHEMA_LOCK = 0x5A6A_0001


def conninfo(env: dict[str, str]) -> str:
    """A libpq connection string from the library's POSTGRES_* settings."""
    return psycopg.conninfo.make_conninfo(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env.get("POSTGRES_PASSWORD") or None,
        connect_timeout=env.get("POSTGRES_CONNECT_TIMEOUT", "10"),
    )


def create_schema(env: dict[str, str]) -> None:
    """Create the schema, the events table and the index tables, once, whoever starts first."""
    from eventsourcing.postgres import PostgresFactory
    from eventsourcing.utils import Environment

    schema = env.get("POSTGRES_SCHEMA", "public")
    try:
        with psycopg.connect(conninfo(env), autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
                factory = PostgresFactory(
                    Environment(APPLICATION_NAME, {**env, "CREATE_TABLE": "y", "POSTGRES_POOL_SIZE": "1"})
                )
                try:
                    factory.application_recorder()
                finally:
                    factory.close()
                migrate(conn, schema)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
    except psycopg.OperationalError as error:
        text = redact_in(" ".join(str(error).split()), [env.get("POSTGRES_PASSWORD", "")])
        where = f"PostgreSQL at {env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}"
        if refused(error):
            raise StorageError(f"{where} refused the connection: {text}") from None
        raise StorageUnavailable(f"cannot reach {where}: {text}") from None
    except psycopg.Error as error:
        text = redact_in(" ".join(str(error).split()), [env.get("POSTGRES_PASSWORD", "")])
        raise StorageError(f"cannot prepare the PostgreSQL database: {text}") from None


# libpq reports a refused login without a SQLSTATE; these are the server's words for "no".
REFUSALS = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")


def refused(error: BaseException) -> bool:
    """Whether the server answered and said no (bad login, no such database): waiting will not help.

    A server that is starting up or has too many connections also answers FATAL, and is transient.
    """
    text = str(error)
    return "FATAL" in text and any(marker in text for marker in REFUSALS)


def migrate(conn: psycopg.Connection[Any], schema: str) -> None:
    """Apply the migrations this database has not had yet (the caller holds the schema lock)."""
    with conn.transaction():
        conn.execute(_sql("CREATE TABLE IF NOT EXISTS {schema}.saga_schema (version integer NOT NULL)", schema))
        row = conn.execute(_sql("SELECT max(version) FROM {schema}.saga_schema", schema)).fetchone()
        version = row[0] if row and row[0] is not None else 0
        for statement in MIGRATIONS[version:]:
            conn.execute(_sql(statement, schema))
        if version < len(MIGRATIONS):
            conn.execute(_sql("DELETE FROM {schema}.saga_schema", schema))
            conn.execute(_sql("INSERT INTO {schema}.saga_schema VALUES (%s)", schema), (len(MIGRATIONS),))


def _sql(statement: str, schema: str, **names: str) -> Composed:
    identifiers = {key: Identifier(value) for key, value in names.items()}
    return SQL(statement).format(schema=Identifier(schema), **identifiers)


class PostgresIndexRecorder(PostgresApplicationRecorder):
    """PostgreSQL recorder that writes the work and status rows in the events' transaction."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        s = self.datastore.schema
        # One statement per table for the whole batch (arrays unnested), not one per saga; arrays
        # go in binary (%b), since quoting JSON documents into a text array costs more than the save.
        # Equal versions may be rewritten by a rebuild; earlier ones never overwrite later ones.
        self.upsert_status = _sql(
            "INSERT INTO {schema}.saga_status (saga_uuid, saga_id, saga, state, version, created_at, updated_at, doc)"
            " SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[],"
            " %b::text[], %b::int[], %b::timestamptz[], %b::timestamptz[], %b::jsonb[])"
            " ON CONFLICT (saga_uuid) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version,"
            " updated_at = EXCLUDED.updated_at, doc = EXCLUDED.doc, problem = NULL"
            " WHERE saga_status.version <= EXCLUDED.version",
            s,
        )
        # Writing a row releases any lease on it: the events just saved say what is due next.
        self.upsert_work = _sql(
            "INSERT INTO {schema}.saga_work (saga_uuid, due_at, version)"
            " SELECT u, d, v FROM unnest(%b::uuid[], %b::timestamptz[], %b::int[]) AS t(u, d, v)"
            " ON CONFLICT (saga_uuid) DO UPDATE SET due_at = EXCLUDED.due_at, version = EXCLUDED.version,"
            " lease_owner = NULL, lease_until = NULL, failures = 0",
            s,
        )
        # The library sends events as an array of a composite type, quoted as text on the client;
        # four binary arrays carry the same rows for a fraction of the client's work.
        self.insert_events_statement = _sql(
            "INSERT INTO {schema}.{events} (originator_id, originator_version, topic, state)"
            " SELECT * FROM unnest(%b::uuid[], %b::int8[], %b::text[], %b::bytea[])"
            " RETURNING notification_id",
            s,
            events=self.events_table_name,
        )
        self.select_many = _sql(
            "SELECT originator_id, originator_version, topic, state FROM {schema}.{events}"
            " WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version",
            s,
            events=self.events_table_name,
        )
        self.delete_work = _sql("DELETE FROM {schema}.saga_work WHERE saga_uuid = ANY(%s)", s)
        # We hold the events table's EXCLUSIVE lock here, so max(notification_id) is our last event.
        self.track = _sql(
            "INSERT INTO {schema}.saga_status_tracking"
            " SELECT %s, max(notification_id) FROM {schema}.{events} "
            " ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id",
            s,
            events=self.events_table_name,
        )
        # The claim and the claimed sagas' histories in one round trip; SKIP LOCKED, so concurrent
        # workers each take different rows instead of queueing on the same ones.
        self.claim_loaded_sql = _sql(
            "WITH claimed AS (UPDATE {schema}.saga_work w SET lease_owner = %(owner)s, lease_until = %(until)s"
            " FROM (SELECT saga_uuid FROM {schema}.saga_work"
            "       WHERE due_at <= %(now)s AND (lease_until IS NULL OR lease_until < %(now)s)"
            "       ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c"
            " WHERE w.saga_uuid = c.saga_uuid RETURNING w.saga_uuid, w.version)"
            " SELECT claimed.saga_uuid, claimed.version, e.originator_version, e.topic, e.state"
            " FROM claimed JOIN {schema}.{events} e ON e.originator_id = claimed.saga_uuid"
            " ORDER BY e.originator_id, e.originator_version",
            s,
            events=self.events_table_name,
        )
        self.schema_name = s
        self.own_pids: set[int] = set()
        """Server pids of this process's connections that wrote events: their NOTIFYs are our own."""

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        # As the library does: lock the table (so notification ids commit in order), notify
        # listeners, insert, and leave the returned ids on this cursor for the library to read.
        self.own_pids.add(curs.connection.info.backend_pid)
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self.insert_events_statement,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            prepare=True,  # planned once per connection, not per save
        )
        entries: Sequence[IndexEntry] = kwargs.get("index", ())
        # After the library's lock and insert, on another cursor: the insert's cursor still owes
        # the notification ids to the library, and the lock orders our rows like the events.
        with curs.connection.cursor() as index:
            if entries:
                index.execute(self.upsert_status, _status_columns(entries), prepare=True)
                dues = [e for e in entries if e.due_at is not None]
                if dues:
                    index.execute(
                        self.upsert_work,
                        ([e.saga_uuid for e in dues], [e.due_at for e in dues], [e.version for e in dues]),
                        prepare=True,
                    )
                done = [e.saga_uuid for e in entries if e.due_at is None]
                if done:
                    index.execute(self.delete_work, (done,), prepare=True)
            index.execute(self.track, (APPLICATION_NAME,), prepare=True)

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        pool_kwargs = self.datastore.pool.kwargs
        assert isinstance(pool_kwargs, dict)  # the library passes its connection settings as a dict
        params = {key: value for key, value in pool_kwargs.items() if key != "row_factory" and value}
        return Listener(psycopg.conninfo.make_conninfo(**params), self.channel_name, wake, self.own_pids)

    def claim_loaded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> tuple[list[Claim], list[StoredEvent]]:
        params = {"owner": owner, "until": lease_until, "now": now, "limit": limit}
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self.claim_loaded_sql, params, prepare=True)
            rows = curs.fetchall()
        claims = list({row["saga_uuid"]: Claim(row["saga_uuid"], row["version"]) for row in rows}.values())
        events = [
            StoredEvent(row["saga_uuid"], row["originator_version"], row["topic"], bytes(row["state"])) for row in rows
        ]
        return claims, events

    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        with self.datastore.transaction(commit=True) as curs:
            if due_at is None:
                curs.execute(
                    _sql("DELETE FROM {schema}.saga_work WHERE saga_uuid = %s AND version = %s", self.schema_name),
                    (saga_uuid, version),
                )
            else:
                curs.execute(
                    _sql(
                        "UPDATE {schema}.saga_work SET due_at = %s, lease_owner = NULL, lease_until = NULL"
                        " WHERE saga_uuid = %s AND version = %s",
                        self.schema_name,
                    ),
                    (due_at, saga_uuid, version),
                )

    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                _sql(
                    "SELECT failures FROM {schema}.saga_work WHERE saga_uuid = %s AND version = %s FOR UPDATE",
                    self.schema_name,
                ),
                (saga_uuid, version),
            )
            row = curs.fetchone()
            if row is None:
                return None  # the saga moved on meanwhile
            failures = int(row["failures"]) + 1
            due_at = now + set_aside_delay(failures)
            curs.execute(
                _sql(
                    "UPDATE {schema}.saga_work SET due_at = %s, lease_owner = NULL, lease_until = NULL, failures = %s"
                    " WHERE saga_uuid = %s",
                    self.schema_name,
                ),
                (due_at, failures, saga_uuid),
            )
            curs.execute(
                _sql(
                    "UPDATE {schema}.saga_status SET problem = %s WHERE saga_uuid = %s AND version = %s",
                    self.schema_name,
                ),
                (problem, saga_uuid, version),
            )
        return due_at

    def select_events_many(self, saga_uuids: list[UUID]) -> list[StoredEvent]:
        if not saga_uuids:
            return []
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self.select_many, (saga_uuids,), prepare=True)
            return [
                StoredEvent(row["originator_id"], row["originator_version"], row["topic"], bytes(row["state"]))
                for row in curs.fetchall()
            ]

    def next_due(self) -> datetime | None:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                _sql("SELECT min(GREATEST(due_at, lease_until)) AS due FROM {schema}.saga_work", self.schema_name)
            )
            row = curs.fetchone()
        return None if row is None else row["due"]

    def get_status(self, saga_uuid: UUID) -> bytes | None:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                _sql(
                    "SELECT doc::text AS doc, problem FROM {schema}.saga_status WHERE saga_uuid = %s",
                    self.schema_name,
                ),
                (saga_uuid,),
                prepare=True,
            )
            row = curs.fetchone()
        return None if row is None else with_problem(row["doc"].encode(), row["problem"])

    def list_status(self, state: str | None, saga: str | None, limit: int) -> list[bytes]:
        where = []
        params: list[Any] = []
        if state is not None:
            where.append("state = %s")
            params.append(state)
        if saga is not None:
            where.append("saga = %s")
            params.append(saga)
        sql = "SELECT doc::text AS doc, problem FROM {schema}.saga_status"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC LIMIT %s"
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(_sql(sql, self.schema_name), (*params, limit), prepare=True)
            return [with_problem(row["doc"].encode(), row["problem"]) for row in curs.fetchall()]

    def status_position(self) -> int | None:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                _sql(
                    "SELECT notification_id FROM {schema}.saga_status_tracking WHERE application_name = %s",
                    self.schema_name,
                ),
                (APPLICATION_NAME,),
            )
            row = curs.fetchone()
        return None if row is None else int(row["notification_id"])

    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        with self.datastore.transaction(commit=True) as curs:
            if reset:
                curs.execute(_sql("DELETE FROM {schema}.saga_status", self.schema_name))
                curs.execute(_sql("DELETE FROM {schema}.saga_status_tracking", self.schema_name))
            if entries:
                curs.execute(self.upsert_status, _status_columns(entries))
            if position is not None:
                curs.execute(
                    _sql(
                        "INSERT INTO {schema}.saga_status_tracking VALUES (%s, %s) ON CONFLICT (application_name)"
                        " DO UPDATE SET notification_id = EXCLUDED.notification_id"
                        " WHERE saga_status_tracking.notification_id < EXCLUDED.notification_id",
                        self.schema_name,
                    ),
                    (APPLICATION_NAME, position),
                )


def _status_columns(entries: Sequence[IndexEntry]) -> tuple[list[Any], ...]:
    return (
        [e.saga_uuid for e in entries],
        [e.saga_id for e in entries],
        [e.saga for e in entries],
        [e.state for e in entries],
        [e.version for e in entries],
        [e.created_at for e in entries],
        [e.updated_at for e in entries],
        [e.doc.decode() for e in entries],
    )


class Listener(ThreadWaker):
    """Wakes a worker when others write events: LISTEN on the library's NOTIFY channel.

    Runs in a thread with its own connection; if the connection drops it reconnects,
    and the worker's polling covers the gap.
    """

    name = "saga-listen"

    def __init__(self, info: str, channel: str, wake: Callable[[], None], own_pids: set[int]) -> None:
        super().__init__(wake)
        self.info = info
        self.channel = channel
        self.own_pids = own_pids

    def watch(self) -> None:
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.info, autocommit=True) as conn:
                    conn.execute(SQL("LISTEN {}").format(Identifier(self.channel)))
                    while not self.stopping.is_set():
                        for notify in conn.notifies(timeout=0.2):
                            # A worker carries its own sagas on: only others' writes are news.
                            if notify.pid not in self.own_pids:
                                self.wake()
            except psycopg.Error:
                self.wake()
                self.stopping.wait(1.0)


def connect(env: dict[str, str]) -> psycopg.Connection[Any]:
    """A plain autocommit connection with the store's settings (for tools such as ``saga bench --limit``)."""
    return psycopg.connect(conninfo(env), autocommit=True)
