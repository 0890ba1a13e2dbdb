"""What the SQL backends share: their named queries and migrations, and the index logic over them.

Each dialect keeps its SQL in ``queries/<dialect>.sql`` as named blocks (``-- name: claim``) and
numbered migrations (``-- migration: 2``), as procrastinate does (``named.py`` reads them);
``SqlIndex`` holds the logic once, and a dialect adds only how it talks to its database.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Tracking

from orchestrator.limits import BUCKETS, AdmissionCheck, check_admission
from orchestrator.storage.named import Cursor, Queries
from orchestrator.storage.ports import (
    APPLICATION_NAME,
    Delivery,
    IndexEntry,
    SagaIndex,
    StatusQuery,
    set_aside_delay,
    with_problem,
)


class SqlIndex(SagaIndex):
    """The saga index over a dialect's named queries; subclasses say how to reach the database."""

    queries: Queries

    @abstractmethod
    def transaction(self, *, commit: bool) -> AbstractContextManager[Cursor]:
        """A cursor in a transaction, committed at the end if ``commit`` (else rolled back)."""

    def reading(self) -> AbstractContextManager[Cursor]:
        """A cursor for one statement that only reads (a status, a page, the counts); the
        PostgreSQL index runs it outside a transaction: one round trip, not three."""
        return self.transaction(commit=False)

    @abstractmethod
    def query(self, name: str, **fragments: str) -> Any:
        """The named query, ready for this dialect's ``execute`` (``fragments`` fill its ``{slots}``)."""

    @abstractmethod
    def param(self, name: str) -> str:
        """How this dialect writes the named parameter ``name`` in a query."""

    @abstractmethod
    def key(self, saga_uuid: UUID) -> Any:
        """A saga's key as this dialect stores it."""

    @abstractmethod
    def moment(self, at: datetime | None) -> Any:
        """A time as this dialect stores it."""

    @abstractmethod
    def from_moment(self, value: Any) -> datetime | None:
        """A stored time back as an aware datetime."""

    def rows(
        self, cursor: Cursor, name: str, params: dict[str, Any] | None = None, **fragments: str
    ) -> list[tuple[Any, ...]]:
        """Run a named query; its rows as tuples."""
        cursor.execute(self.query(name, **fragments), params or {})
        return [tuple(row.values()) if isinstance(row, dict) else tuple(row) for row in cursor.fetchall()]

    def run(self, cursor: Cursor, name: str, params: dict[str, Any] | None = None) -> None:
        """Run a named query that returns nothing."""
        cursor.execute(self.query(name), params or {})

    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        params = {"saga_uuid": self.key(saga_uuid), "version": version, "due_at": self.moment(due_at)}
        with self.transaction(commit=True) as cursor:
            self.run(cursor, "release_done" if due_at is None else "release", params)

    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        key = self.key(saga_uuid)
        with self.transaction(commit=True) as cursor:
            counted = self.rows(cursor, "count_failure", {"saga_uuid": key, "version": version})
            if not counted:
                return None  # the saga moved on meanwhile
            due_at = now + set_aside_delay(int(counted[0][0]))
            self.run(cursor, "defer", {"saga_uuid": key, "due_at": self.moment(due_at)})
            self.run(cursor, "note_problem", {"saga_uuid": key, "version": version, "problem": problem})
        return due_at

    def next_due(self) -> datetime | None:
        with self.transaction(commit=False) as cursor:
            ((due,),) = self.rows(cursor, "next_due")
        return self.from_moment(due)

    def get_status(self, saga_uuid: UUID) -> bytes | None:
        with self.reading() as cursor:
            found = self.rows(cursor, "get_status", {"saga_uuid": self.key(saga_uuid)})
        return with_problem(_bytes(found[0][0]), found[0][1]) if found else None

    def list_status(self, query: StatusQuery, limit: int) -> list[bytes]:
        where, params = self.where(query)
        params["limit"] = limit
        with self.reading() as cursor:
            found = self.rows(cursor, "list_status", params, where=where)
        return [with_problem(_bytes(doc), problem) for doc, problem in found]

    def count_status(self, query: StatusQuery) -> list[tuple[str, str, int]]:
        where, params = self.where(query)
        with self.reading() as cursor:
            found = self.rows(cursor, "count_status", params, where=where)
        return [(saga, state, int(count)) for saga, state, count in found]

    def where(self, query: StatusQuery) -> tuple[str, dict[str, Any]]:
        """The WHERE clause and parameters of a status query (columns fixed here; values as parameters)."""
        clauses: list[str] = []
        params: dict[str, Any] = {}

        def add(clause: str, **values: Any) -> None:
            clauses.append(clause.format(**{name: self.param(name) for name in values}))
            params.update(values)

        if query.state is not None:
            add("state = {state}", state=query.state)
        if query.saga is not None:
            add("saga = {saga}", saga=query.saga)
        for column, bound, value in (
            ("created_at", ">=", query.created_after),
            ("created_at", "<", query.created_before),
            ("updated_at", ">=", query.updated_after),
            ("updated_at", "<", query.updated_before),
        ):
            if value is not None:
                name = f"{column}_{'from' if bound == '>=' else 'to'}"
                add(f"{column} {bound} {{{name}}}", **{name: self.moment(value)})
        if query.search:
            clause, values = self.search_clause(query.search)
            clauses.append(clause)
            params.update(values)
        if query.after is not None:
            at, key = self.moment(query.after[0]), self.key(query.after[1])
            add(
                "(updated_at < {after_at} OR (updated_at = {after_at} AND saga_uuid < {after_key}))",
                after_at=at,
                after_key=key,
            )
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    @abstractmethod
    def search_clause(self, search: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A clause matching rows whose searchable fields equal ``search``, with its parameters."""

    def status_position(self) -> int | None:
        with self.transaction(commit=False) as cursor:
            found = self.rows(cursor, "status_position", {"application": APPLICATION_NAME})
        return int(found[0][0]) if found else None

    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        with self.transaction(commit=True) as cursor:
            if reset:
                self.run(cursor, "reset_status")
                self.run(cursor, "reset_tracking")
            if entries:
                self.upsert_status(cursor, entries)
            if position is not None:
                self.run(cursor, "track", {"application": APPLICATION_NAME, "position": position})

    @abstractmethod
    def upsert_status(self, cursor: Cursor, entries: Sequence[IndexEntry]) -> None:
        """Upsert the status rows of ``entries`` (the ``upsert_status`` query, batched as the dialect can)."""

    @abstractmethod
    def track(self, cursor: Cursor, tracking: Tracking) -> None:
        """Insert a follower's tracking record in this transaction (the library's, on its tracking table)."""

    @abstractmethod
    def tracking_table(self) -> str:
        """The name of the library's tracking table, as this dialect writes it in a query."""

    # Followers

    def advance(self, tracking: Tracking) -> None:
        with self.transaction(commit=True) as cursor:
            self.track(cursor, tracking)

    def write_rows(self, projection: str, rows: dict[str, bytes | None], tracking: Tracking) -> None:
        with self.transaction(commit=True) as cursor:
            self.put_rows(cursor, [(projection, key, doc) for key, doc in rows.items()])
            self.track(cursor, tracking)

    def put_rows(self, cursor: Cursor, rows: Sequence[tuple[str, str, bytes | None]]) -> None:
        """Put (``None``: delete) projection rows in this transaction (also from an event save's ``rows``)."""
        for projection, key, doc in rows:
            if doc is None:
                self.run(cursor, "rows_delete", {"projection": projection, "key": key})
            else:
                self.run(cursor, "rows_put", {"projection": projection, "key": key, "doc": doc.decode()})

    def read_rows(self, projection: str, keys: list[str] | None = None) -> dict[str, bytes]:
        with self.transaction(commit=False) as cursor:
            return self.rows_in(cursor, projection, keys)

    def rows_in(self, cursor: Cursor, projection: str, keys: list[str] | None) -> dict[str, bytes]:
        """A projection's rows by key, read in this transaction."""
        if keys is None:
            found = self.rows(cursor, "rows_all", {"projection": projection})
        elif not keys:
            return {}
        else:
            params = {"projection": projection, **self.keys_param(keys)}
            found = self.rows(cursor, "rows_get", params, keys=self.keys_slot(keys))
        return {key: _bytes(doc) for key, doc in found}

    # Retention

    def purge_candidates(self, state: str, before: datetime, safe: int | None, limit: int) -> list[UUID]:
        params = {"state": state, "before": self.moment(before), "safe": safe, "limit": limit}
        with self.transaction(commit=False) as cursor:
            return [UUID(str(key)) for (key,) in self.rows(cursor, "purge_candidates", params)]

    def purge(self, saga_uuids: list[UUID], *, histories: bool) -> None:
        if not saga_uuids:
            return
        keys = [self.key(u) for u in saga_uuids]
        names = ["purge_status", "purge_work", "purge_deliveries", *(["purge_events"] if histories else [])]
        with self.transaction(commit=True) as cursor:
            for name in names:
                cursor.execute(self.query(name, keys=self.keys_slot(keys)), self.keys_param(keys))

    def tracking_positions(self) -> dict[str, int]:
        with self.transaction(commit=False) as cursor:
            found = self.rows(cursor, "tracking_all", tracking=self.tracking_table())
        return {name: int(position) for name, position in found}

    # Throughput guards

    def pool_running(self, pool: str) -> dict[str, int]:
        with self.transaction(commit=False) as cursor:
            return self._running(cursor, pool)

    def _running(self, cursor: Cursor, pool: str) -> dict[str, int]:
        return {key: int(count) for key, count in self.rows(cursor, "pool_running", {"pool": pool})}

    def pool_waiting(self, pool: str, limit: int, now: datetime, full: list[str]) -> list[tuple[UUID, str]]:
        params = {"pool": pool, "limit": limit, "now": self.moment(now), "full": self.key_list(full)}
        with self.transaction(commit=False) as cursor:
            found = self.rows(cursor, "pool_waiting", params)
        return [(UUID(str(u)), key) for u, key in found]

    def pool_queued(self) -> list[str]:
        with self.transaction(commit=False) as cursor:
            return [pool for (pool,) in self.rows(cursor, "pool_queued")]

    @abstractmethod
    def key_list(self, keys: list[str]) -> Any:
        """A list of texts as one query parameter (an array, or JSON for SQLite's ``json_each``)."""

    def check_admission(self, cursor: Cursor, check: AdmissionCheck, unwritten: Sequence[IndexEntry] = ()) -> None:
        """Refuse (``PoolFull``) an admission that this transaction's view of the pool does not allow;
        ``unwritten``: the save's index entries, when the check runs before they are written."""
        bucket = self.rows_in(cursor, BUCKETS, [check.pool]).get(check.pool)
        running = self._running(cursor, check.pool)
        for entry in unwritten:
            if entry.pool == check.pool and not entry.queued:
                running[entry.pool_key] = running.get(entry.pool_key, 0) + 1
        check_admission(check, running, bucket)

    def reset_follower(self, name: str, projection: str | None = None) -> None:
        with self.transaction(commit=True) as cursor:
            if projection is not None:
                self.run(cursor, "rows_reset", {"projection": projection})
            cursor.execute(self.query("tracking_reset", tracking=self.tracking_table()), {"name": name})

    def add_deliveries(self, deliveries: list[Delivery], due_at: datetime, tracking: Tracking) -> None:
        with self.transaction(commit=True) as cursor:
            for d in deliveries:
                params = {
                    "delivery_id": self.key(d.delivery_id),
                    "saga_uuid": self.key(d.saga_uuid),
                    "saga_id": d.saga_id,
                    "saga": d.saga,
                    "kind": d.kind,
                    "target": d.target,
                    "body": d.body,
                    "due_at": self.moment(due_at),
                }
                self.run(cursor, "delivery_add", params)
            self.track(cursor, tracking)

    def claim_deliveries(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Delivery]:
        params = {"owner": owner, "until": self.moment(lease_until), "now": self.moment(now), "limit": limit}
        with self.transaction(commit=False) as cursor:
            if not self.rows(cursor, "delivery_due", {"now": params["now"]}):
                return []
        with self.transaction(commit=True) as cursor:
            return [self._delivery(row) for row in self.rows(cursor, "delivery_claim", params)]

    def finish_delivery(
        self,
        delivery: Delivery,
        owner: str,
        *,
        due_at: datetime | None,
        delivered_at: datetime | None,
        error: str | None,
    ) -> None:
        params = {
            "delivery_id": self.key(delivery.delivery_id),
            "owner": owner,
            "attempts": delivery.attempts,
            "due_at": self.moment(due_at),
            "delivered_at": self.moment(delivered_at),
            "last_error": error,
            "log": orjson.dumps(list(delivery.log)).decode(),
        }
        with self.transaction(commit=True) as cursor:
            self.run(cursor, "delivery_done", params)

    def deliveries_of(self, saga_uuid: UUID) -> list[Delivery]:
        with self.transaction(commit=False) as cursor:
            return [
                self._delivery(row) for row in self.rows(cursor, "deliveries_of", {"saga_uuid": self.key(saga_uuid)})
            ]

    def _delivery(self, row: tuple[Any, ...]) -> Delivery:
        delivery_id, saga_uuid, saga_id, saga, kind, target, body, attempts, log = row
        return Delivery(
            delivery_id=_uuid(delivery_id),
            saga_uuid=_uuid(saga_uuid),
            saga_id=saga_id,
            saga=saga,
            kind=kind,
            target=target,
            body=bytes(body),
            attempts=int(attempts),
            log=tuple(orjson.loads(log)),
        )

    def keys_param(self, keys: list[str]) -> dict[str, Any]:
        """The parameters of a list of keys for the ``{keys}`` slot (see ``keys_slot``)."""
        return {f"k{i}": key for i, key in enumerate(keys)}

    def keys_slot(self, keys: list[str]) -> str:
        """What fills a query's ``{keys}`` slot for these keys."""
        return ", ".join(self.param(f"k{i}") for i in range(len(keys)))


def _bytes(doc: bytes | str | memoryview) -> bytes:
    return doc.encode() if isinstance(doc, str) else bytes(doc)


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)
