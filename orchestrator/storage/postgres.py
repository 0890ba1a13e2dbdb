"""The PostgreSQL backend: its index recorder, schema creation and LISTEN wake-ups.

The only module of the engine that imports psycopg.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from eventsourcing.persistence import StoredEvent, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresProcessRecorder
from psycopg.rows import DictRow, tuple_row
from psycopg.sql import SQL, Composable, Composed, Identifier

from orchestrator.errors import StorageError, StorageUnavailable
from orchestrator.safety import redact_in
from orchestrator.storage.named import Cursor, Queries, statements
from orchestrator.storage.ports import APPLICATION_NAME, Claim, IndexEntry, RecordClaimed, ThreadWaker, Waker
from orchestrator.storage.sql import SqlIndex

QUERIES = Queries.load("postgres")

# Any two processes may start at once; DDL (the library's CREATE OR REPLACE FUNCTION among it)
# fails with "tuple concurrently updated" when run concurrently, so it runs under this lock.
SCHEMA_LOCK = 0x5A6A_0001

# libpq reports a refused login without a SQLSTATE; these are the server's words for "no".
REFUSALS = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")


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
    """Create the schema, the events table and the index tables, and migrate them, once, whoever
    starts first."""
    from eventsourcing.postgres import PostgresFactory
    from eventsourcing.utils import Environment

    schema = env.get("POSTGRES_SCHEMA", "public")
    secrets = [env.get("POSTGRES_PASSWORD", "")]
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
        text = redact_in(" ".join(str(error).split()), secrets)
        where = f"PostgreSQL at {env['POSTGRES_HOST']}:{env['POSTGRES_PORT']}"
        if refused(error):
            raise StorageError(f"{where} refused the connection: {text}") from None
        raise StorageUnavailable(f"cannot reach {where}: {text}") from None
    except psycopg.Error as error:
        text = redact_in(" ".join(str(error).split()), secrets)
        raise StorageError(f"cannot prepare the PostgreSQL database: {text}") from None


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
        for statement in statements(QUERIES.migrations, version):
            conn.execute(_sql(statement, schema))
        if version < len(QUERIES.migrations):
            conn.execute(_sql("DELETE FROM {schema}.saga_schema", schema))
            conn.execute(_sql("INSERT INTO {schema}.saga_schema VALUES (%s)", schema), (len(QUERIES.migrations),))


def _sql(statement: str, schema: str, **names: str | Composable) -> Composed:
    parts: dict[str, Composable] = {
        key: Identifier(value) if isinstance(value, str) else value for key, value in names.items()
    }
    return SQL(statement).format(schema=Identifier(schema), **parts)


class PostgresIndexRecorder(SqlIndex, PostgresProcessRecorder):
    """PostgreSQL recorder that writes the work and status rows in the events' transaction, and the
    tracking records of the log's followers (the library's process recorder: events + tracking)."""

    queries = QUERIES

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        kwargs.setdefault("tracking_table_name", f"{APPLICATION_NAME}_tracking")
        super().__init__(datastore, **kwargs)
        self.schema_name = self.datastore.schema
        # Queries with a slot the index fills per call (a WHERE clause, a table) are compiled per call.
        static = {
            name: text for name, text in QUERIES.named.items() if "{where}" not in text and "{tracking}" not in text
        }
        self.compiled = {name: self._compile(text) for name, text in static.items()}
        self.insert_events_statement = self.compiled["insert_events"]
        self.own_pids: set[int] = set()
        """Server pids of this process's connections that wrote events: their NOTIFYs are our own."""

    def _compile(self, text: str, **fragments: str) -> Composed:
        # Fragments are SQL the index itself builds (a WHERE clause of fixed columns), never input;
        # a table name goes in as an identifier.
        pieces: dict[str, Composable] = {
            name: Identifier(fragment) if name == "tracking" else SQL(fragment) for name, fragment in fragments.items()
        }
        return _sql(text, self.schema_name, events=self.events_table_name, **pieces)

    # The dialect

    @contextmanager
    def transaction(self, *, commit: bool) -> Iterator[Cursor]:
        with self.datastore.transaction(commit=commit) as curs:
            yield curs

    @contextmanager
    def reading(self) -> Iterator[Cursor]:
        # The pool's connections are in autocommit mode: a lone SELECT needs no BEGIN and ROLLBACK.
        with self.datastore.cursor() as cursor:
            yield cursor

    def query(self, name: str, **fragments: str) -> Any:
        return self._compile(QUERIES.named[name], **fragments) if fragments else self.compiled[name]

    def param(self, name: str) -> str:
        return f"%({name})s"

    def search_clause(self, search: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # Containment, so the GIN index on search serves any combination of fields.
        return "search @> %(search)s::jsonb", {"search": orjson.dumps(search).decode()}

    def key(self, saga_uuid: UUID) -> Any:
        return saga_uuid

    def moment(self, at: datetime | None) -> Any:
        return at

    def from_moment(self, value: Any) -> datetime | None:
        return value if isinstance(value, datetime) else None

    def rows(
        self, cursor: Cursor, name: str, params: dict[str, Any] | None = None, **fragments: str
    ) -> list[tuple[Any, ...]]:
        assert isinstance(cursor, psycopg.Cursor)
        cursor.row_factory = tuple_row  # the library's cursors make dicts; the index reads tuples
        # Planned once per connection, not per call: these run on every status read and claim.
        cursor.execute(self.query(name, **fragments), params or {}, prepare=True)
        return cursor.fetchall()

    def upsert_status(self, cursor: Cursor, entries: Sequence[IndexEntry]) -> None:
        assert isinstance(cursor, psycopg.Cursor)
        cursor.execute(self.compiled["upsert_status"], _status_columns(entries), prepare=True)

    def track(self, cursor: Cursor, tracking: Tracking) -> None:
        assert isinstance(cursor, psycopg.Cursor)
        cursor.row_factory = psycopg.rows.dict_row  # the library's insert reads its row by name
        self._insert_tracking(cursor, tracking)

    def tracking_table(self) -> str:
        return self.tracking_table_name

    def tracked(self, name: str) -> int | None:
        position = self.max_tracking_id(name)
        return None if position is None else int(position)

    def keys_param(self, keys: list[str]) -> dict[str, Any]:
        return {"keys": keys}

    def key_list(self, keys: list[str]) -> Any:
        return keys

    def keys_slot(self, keys: list[str]) -> str:
        return ""

    # Writes in the events' transaction

    def _insert_stored_events(
        self, curs: psycopg.Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        # As the library does: lock the table (so notification ids commit in order), insert, leave
        # the returned ids on this cursor for the library to read, and notify listeners (here with
        # the index rows, in one statement).
        #
        # The library keeps an exception raised here until its transaction has ended, and that
        # ends in a COMMIT unless a statement failed: whatever was written before a Python error
        # would stay. So nothing here raises after the first write; the admission check, which
        # must see the pool under the lock, runs before it.
        self.own_pids.add(curs.connection.info.backend_pid)
        self._lock_table(curs)
        entries: Sequence[IndexEntry] = kwargs.get("index", ())
        if (check := kwargs.get("admission")) is not None:
            with curs.connection.cursor() as reader:
                self.check_admission(reader, check, entries)
        index_params = _index_params(entries, self.channel_name)
        curs.execute(
            self.insert_events_statement,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
            prepare=True,
        )
        # After the library's lock and insert, on another cursor: the insert's cursor still owes
        # the notification ids to the library, and the lock orders our rows like the events.
        with curs.connection.cursor() as index:
            index.execute(self.compiled["write_index"], index_params, prepare=True)
            self.put_rows(index, kwargs.get("rows", ()))

    # Reads and claims

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        pool_kwargs = self.datastore.pool.kwargs
        assert isinstance(pool_kwargs, dict)  # the library passes its connection settings as a dict
        params = {key: value for key, value in pool_kwargs.items() if key != "row_factory" and value}
        return Listener(psycopg.conninfo.make_conninfo(**params), self.channel_name, wake, self.own_pids)

    def claim(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Claim]:
        params = {"owner": owner, "until": lease_until, "now": now, "limit": limit}
        with self.transaction(commit=True) as cursor:
            return [Claim(uuid, version) for uuid, version in self.rows(cursor, "claim", params)]

    def claim_loaded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> tuple[list[Claim], list[StoredEvent]]:
        params = {"owner": owner, "until": lease_until, "now": now, "limit": limit}
        with self.transaction(commit=True) as cursor:
            rows = self.rows(cursor, "claim_loaded", params)
        claims = list({uuid: Claim(uuid, version) for uuid, version, *_ in rows}.values())
        return claims, [StoredEvent(uuid, v, topic, bytes(state)) for uuid, _, v, topic, state in rows]

    claims_with_save = True

    def claim_recorded(
        self, owner: str, now: datetime, lease_until: datetime, limit: int, record: RecordClaimed
    ) -> tuple[list[Claim], list[StoredEvent]] | None:
        # Here the claim's row locks come first and the events table's second, the other way round
        # from every save: so the table is only tried (NOWAIT), never waited for, and no deadlock
        # can form. If another writer holds it, the claim commits alone and is returned for the
        # caller to save apart; and a claim that finds nothing never touches the table's lock.
        params = {"owner": owner, "until": lease_until, "now": now, "limit": limit}
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            rows = self.rows(curs, "claim_loaded", params)
            claims = list({uuid: Claim(uuid, version) for uuid, version, *_ in rows}.values())
            records = [StoredEvent(uuid, v, topic, bytes(state)) for uuid, _, v, topic, state in rows]
            if not claims:
                return claims, records
            try:
                with conn.transaction():
                    curs.execute(self.compiled["lock_events_nowait"], prepare=True)
            except psycopg.errors.LockNotAvailable:
                return claims, records
            stored, entries = record(claims, records)
            if entries:
                self._insert_stored_events(curs, stored, index=entries)
        return None

    def select_events_many(self, saga_uuids: list[UUID], *, first_only: bool = False) -> list[StoredEvent]:
        if not saga_uuids:
            return []
        with self.reading() as cursor:
            rows = self.rows(cursor, "first_events_of" if first_only else "events_of", {"keys": saga_uuids})
        return [StoredEvent(uuid, version, topic, bytes(state)) for uuid, version, topic, state in rows]


def _index_params(entries: Sequence[IndexEntry], channel: str) -> tuple[Any, ...]:
    """The parameters of ``write_index``: status columns, due work rows, finished ones, head, channel."""
    dues = [e for e in entries if e.due_at is not None]
    return (
        *_status_columns(entries),
        [e.saga_uuid for e in dues],
        [e.due_at for e in dues],
        [e.version for e in dues],
        [e.saga_uuid for e in entries if e.due_at is None],
        APPLICATION_NAME,
        channel,
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
        [None if e.search is None else e.search.decode() for e in entries],
        [e.pool for e in entries],
        [e.pool_key for e in entries],
        [e.queued for e in entries],
        [e.pool_due for e in entries],
    )


class Listener(ThreadWaker):
    """Wakes a worker when others write events: LISTEN on the library's NOTIFY channel.

    Runs in a thread with its own connection; if the connection drops it reconnects, and the
    worker's polling covers the gap.
    """

    name = "saga-listen"
    errors = (psycopg.Error,)

    def __init__(self, info: str, channel: str, wake: Callable[[], None], own_pids: set[int]) -> None:
        super().__init__(wake)
        self.info = info
        self.channel = channel
        self.own_pids = own_pids

    def watch_once(self) -> None:
        with psycopg.connect(self.info, autocommit=True) as conn:
            conn.execute(SQL("LISTEN {}").format(Identifier(self.channel)))
            while not self.stopping.is_set():
                for notify in conn.notifies(timeout=0.2):
                    # A worker carries its own sagas on: only others' writes are news.
                    if notify.pid not in self.own_pids:
                        self.wake()


def connect(env: dict[str, str]) -> psycopg.Connection[Any]:
    """A plain autocommit connection with the store's settings (for tools such as ``saga bench --limit``)."""
    return psycopg.connect(conninfo(env), autocommit=True)
