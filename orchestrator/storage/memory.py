"""The in-memory (POPO) saga index, for tests and experiments: nothing survives the process."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import StoredEvent, Tracking
from eventsourcing.popo import POPOProcessRecorder

from orchestrator.limits import BUCKETS, check_admission
from orchestrator.storage.ports import (
    Claim,
    Delivery,
    IndexEntry,
    SagaIndex,
    StatusQuery,
    Waker,
    set_aside_delay,
    with_problem,
)


class MemoryRecorder(SagaIndex, POPOProcessRecorder):
    """POPO recorder that keeps the work, status, projection and delivery tables in dicts, under the
    store's lock, and the followers' tracking records in the library's own."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dict[UUID, list[Any]] = {}  # [due_at, version, lease_owner, lease_until, failures]
        self.status: dict[UUID, IndexEntry] = {}
        self.problems: dict[UUID, tuple[int, str]] = {}  # (version, problem)
        self.projection_rows: dict[str, dict[str, bytes]] = {}
        self.deliveries: dict[UUID, dict[str, Any]] = {}
        self.position: int | None = None

    def _insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self._database_lock:
            if (check := kwargs.get("admission")) is not None:  # before anything changes: no rollback here
                after = {**self.status, **{e.saga_uuid: e for e in kwargs.get("index", ())}}
                bucket = self.projection_rows.get(BUCKETS, {}).get(check.pool)
                check_admission(check, self._running(after.values(), check.pool), bucket)
            ids = super()._insert_events(stored_events, **kwargs)
            self._apply(kwargs.get("index", ()))
            for projection, key, doc in kwargs.get("rows", ()):
                table = self.projection_rows.setdefault(projection, {})
                if doc is None:
                    table.pop(key, None)
                else:
                    table[key] = doc
            if ids:
                self.position = ids[-1]
        return ids

    def _apply(self, entries: Sequence[IndexEntry]) -> None:
        for entry in entries:
            if entry.due_at is None:
                self.work.pop(entry.saga_uuid, None)
            else:
                self.work[entry.saga_uuid] = [entry.due_at, entry.version, None, None, 0]
            current = self.status.get(entry.saga_uuid)
            if current is None or current.version <= entry.version:
                self.status[entry.saga_uuid] = entry
                self.problems.pop(entry.saga_uuid, None)

    def waker(self, wake: Callable[[], None]) -> Waker | None:
        return None  # one process: its own saves set the wake-up event

    def claim(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Claim]:
        with self._database_lock:
            due = sorted(
                (row[0], uuid) for uuid, row in self.work.items() if row[0] <= now and (row[3] is None or row[3] < now)
            )[:limit]
            claims = []
            for _, uuid in due:
                row = self.work[uuid]
                row[2], row[3] = owner, lease_until
                claims.append(Claim(uuid, row[1]))
            return claims

    def release(self, saga_uuid: UUID, version: int, due_at: datetime | None) -> None:
        with self._database_lock:
            row = self.work.get(saga_uuid)
            if row is not None and row[1] == version:
                if due_at is None:
                    del self.work[saga_uuid]
                else:
                    row[0], row[2], row[3] = due_at, None, None

    def set_aside(self, saga_uuid: UUID, version: int, problem: str, now: datetime) -> datetime | None:
        with self._database_lock:
            row = self.work.get(saga_uuid)
            if row is None or row[1] != version:
                return None
            row[4] += 1
            row[0], row[2], row[3] = now + set_aside_delay(row[4]), None, None
            status = self.status.get(saga_uuid)
            if status is not None and status.version == version:
                self.problems[saga_uuid] = (version, problem)
            due_at: datetime = row[0]
            return due_at

    def _doc(self, entry: IndexEntry) -> bytes:
        problem = self.problems.get(entry.saga_uuid)
        return with_problem(entry.doc, problem[1] if problem else None)

    def next_due(self) -> datetime | None:
        with self._database_lock:
            times = [max(row[0], row[3]) if row[3] else row[0] for row in self.work.values()]
            return min(times, default=None)

    def get_status(self, saga_uuid: UUID) -> bytes | None:
        with self._database_lock:
            entry = self.status.get(saga_uuid)
            return self._doc(entry) if entry else None

    def list_status(self, query: StatusQuery, limit: int) -> list[bytes]:
        with self._database_lock:
            rows = sorted(self._matching(query), key=lambda e: (e.updated_at, e.saga_uuid), reverse=True)
            return [self._doc(e) for e in rows[:limit]]

    def count_status(self, query: StatusQuery) -> list[tuple[str, str, int]]:
        with self._database_lock:
            counts = Counter((e.saga, e.state) for e in self._matching(query))
        return [(saga, state, n) for (saga, state), n in sorted(counts.items())]

    def _matching(self, q: StatusQuery) -> list[IndexEntry]:
        def keep(e: IndexEntry) -> bool:
            search = orjson.loads(e.search) if e.search else {}
            return (
                (q.state is None or e.state == q.state)
                and (q.saga is None or e.saga == q.saga)
                and (q.created_after is None or e.created_at >= q.created_after)
                and (q.created_before is None or e.created_at < q.created_before)
                and (q.updated_after is None or e.updated_at >= q.updated_after)
                and (q.updated_before is None or e.updated_at < q.updated_before)
                and all(
                    name in search and search[name] == value and type(search[name]) is type(value)
                    for name, value in q.search.items()
                )
                and (q.after is None or (e.updated_at, e.saga_uuid) < q.after)
            )

        return [e for e in self.status.values() if keep(e)]

    def status_position(self) -> int | None:
        return self.position

    # Retention

    def purge_candidates(self, state: str, before: datetime, safe: int | None, limit: int) -> list[UUID]:
        with self._database_lock:
            pending = {d["delivery"].saga_uuid for d in self.deliveries.values() if d["due_at"] is not None}
            last: dict[str, int] = {}
            for position, stored in enumerate(self._stored_events, start=1):
                last[str(stored.originator_id)] = position
            found = sorted(
                (
                    e
                    for e in self.status.values()
                    if e.state == state
                    and e.updated_at < before
                    and e.saga_uuid not in pending
                    and (safe is None or last.get(str(e.saga_uuid), 0) <= safe)
                ),
                key=lambda e: e.updated_at,
            )
        return [e.saga_uuid for e in found[:limit]]

    def purge(self, saga_uuids: list[UUID], *, histories: bool) -> None:
        with self._database_lock:
            for saga_uuid in saga_uuids:
                self.status.pop(saga_uuid, None)
                self.work.pop(saga_uuid, None)
                self.problems.pop(saga_uuid, None)
                for key in [k for k, d in self.deliveries.items() if d["delivery"].saga_uuid == saga_uuid]:
                    del self.deliveries[key]
                if histories:  # gone from the aggregate's reads; the in-memory log keeps its positions
                    self._stored_events_index.pop(str(saga_uuid), None)

    def tracking_positions(self) -> dict[str, int]:
        with self._database_lock:
            return {name: position for name, position in self._max_tracking_ids.items() if position is not None}

    # Throughput guards

    def pool_running(self, pool: str) -> dict[str, int]:
        with self._database_lock:
            return self._running(self.status.values(), pool)

    @staticmethod
    def _running(entries: Iterable[IndexEntry], pool: str) -> dict[str, int]:
        return dict(Counter(e.pool_key for e in entries if e.pool == pool and not e.queued))

    def pool_waiting(self, pool: str, limit: int, now: datetime, full: list[str]) -> list[tuple[UUID, str]]:
        with self._database_lock:
            queued = sorted(
                (
                    e
                    for e in self.status.values()
                    if e.pool == pool
                    and e.queued
                    and e.pool_due is not None
                    and e.pool_due <= now
                    and e.pool_key not in full
                ),
                key=lambda e: (e.created_at, e.saga_uuid),
            )
        return [(e.saga_uuid, e.pool_key) for e in queued[:limit]]

    def pool_queued(self) -> list[str]:
        with self._database_lock:
            return sorted({e.pool for e in self.status.values() if e.pool is not None and e.queued})

    def write_status(self, entries: list[IndexEntry], position: int | None, *, reset: bool = False) -> None:
        with self._database_lock:
            if reset:
                self.status.clear()
                self.position = None
            for entry in entries:
                current = self.status.get(entry.saga_uuid)
                if current is None or current.version <= entry.version:
                    self.status[entry.saga_uuid] = entry
                    self.problems.pop(entry.saga_uuid, None)
            if position is not None and (self.position is None or position > self.position):
                self.position = position

    # Followers

    def tracked(self, name: str) -> int | None:
        return self.max_tracking_id(name)

    def advance(self, tracking: Tracking) -> None:
        self.insert_tracking(tracking)

    def write_rows(self, projection: str, rows: dict[str, bytes | None], tracking: Tracking) -> None:
        with self._database_lock:
            self._assert_tracking_uniqueness(tracking)  # first: a refused record writes nothing
            table = self.projection_rows.setdefault(projection, {})
            for key, doc in rows.items():
                if doc is None:
                    table.pop(key, None)
                else:
                    table[key] = doc
            self._insert_tracking(tracking)

    def read_rows(self, projection: str, keys: list[str] | None = None) -> dict[str, bytes]:
        with self._database_lock:
            table = self.projection_rows.get(projection, {})
            return dict(table) if keys is None else {k: table[k] for k in keys if k in table}

    def reset_follower(self, name: str, projection: str | None = None) -> None:
        with self._database_lock:
            if projection is not None:
                self.projection_rows.pop(projection, None)
            self._max_tracking_ids.pop(name, None)

    def add_deliveries(self, deliveries: list[Delivery], due_at: datetime, tracking: Tracking) -> None:
        with self._database_lock:
            self._assert_tracking_uniqueness(tracking)
            for d in deliveries:
                self.deliveries.setdefault(
                    d.delivery_id, {"delivery": d, "due_at": due_at, "owner": None, "until": None}
                )
            self._insert_tracking(tracking)

    def claim_deliveries(self, owner: str, now: datetime, lease_until: datetime, limit: int) -> list[Delivery]:
        with self._database_lock:
            due = sorted(
                (row["due_at"], key)
                for key, row in self.deliveries.items()
                if row["due_at"] is not None and row["due_at"] <= now and (row["until"] is None or row["until"] < now)
            )[:limit]
            for _, key in due:
                row = self.deliveries[key]
                claimed = dataclasses.replace(row["delivery"], attempts=row["delivery"].attempts + 1)
                row.update(owner=owner, until=lease_until, delivery=claimed)
            return [self.deliveries[key]["delivery"] for _, key in due]

    def finish_delivery(
        self,
        delivery: Delivery,
        owner: str,
        *,
        due_at: datetime | None,
        delivered_at: datetime | None,
        error: str | None,
    ) -> None:
        with self._database_lock:
            row = self.deliveries.get(delivery.delivery_id)
            if row is not None and row["owner"] == owner:
                row.update(delivery=delivery, due_at=due_at, owner=None, until=None)

    def deliveries_of(self, saga_uuid: UUID) -> list[Delivery]:
        with self._database_lock:
            found = [row["delivery"] for row in self.deliveries.values() if row["delivery"].saga_uuid == saga_uuid]
        return sorted(found, key=lambda d: (d.kind, d.target))

    def select_events_many(self, saga_uuids: list[UUID], *, first_only: bool = False) -> list[StoredEvent]:
        return [event for uuid in saga_uuids for event in self.select_events(uuid, limit=1 if first_only else None)]
