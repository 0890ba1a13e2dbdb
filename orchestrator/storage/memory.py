"""The in-memory (POPO) saga index, for tests and experiments: nothing survives the process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import StoredEvent
from eventsourcing.popo import POPOApplicationRecorder

from orchestrator.storage.ports import (
    Claim,
    IndexEntry,
    SagaIndex,
    StatusQuery,
    Waker,
    set_aside_delay,
    with_problem,
)


class MemoryRecorder(SagaIndex, POPOApplicationRecorder):
    """POPO recorder that keeps the work and status tables in dicts, under the store's lock."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dict[UUID, list[Any]] = {}  # [due_at, version, lease_owner, lease_until, failures]
        self.status: dict[UUID, IndexEntry] = {}
        self.problems: dict[UUID, tuple[int, str]] = {}  # (version, problem)
        self.position: int | None = None

    def _insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self._database_lock:
            ids = super()._insert_events(stored_events, **kwargs)
            self._apply(kwargs.get("index", ()))
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

    def select_events_many(self, saga_uuids: list[UUID]) -> list[StoredEvent]:
        return [event for uuid in saga_uuids for event in self.select_events(uuid)]
