"""The storage index's contract (``SagaIndex``), the same on memory, SQLite and PostgreSQL: claims and
leases, release, next_due, the status rows and their version guard, list filters and order, set-aside,
the tracking position, batched event reads, and wakers that outlive a broken connection."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest

from orchestrator import Orchestrator
from orchestrator.aggregate import aggregate_id
from orchestrator.events import SagaStarted
from orchestrator.readmodels.status import index_entry
from orchestrator.storage import SagaIndex, StatusQuery, ThreadWaker
from orchestrator.storage.sqlite import DataVersionWatcher
from tests.test_smoke import Ship

LATER = timedelta(seconds=30)


@pytest.fixture
def orch(database_url: str) -> Iterator[Orchestrator]:
    """An open orchestrator with the test saga, on each backend."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        yield orch


def index(orch: Orchestrator) -> SagaIndex:
    return orch.repository.index


def started(orch: Orchestrator, *names: str) -> list[str]:
    """Start one saga per name (ids are the names), one at a time, so their due times are ordered."""
    return [orch.start(Ship, {"item": name}, saga_id=name) for name in names]


def test_claim_takes_due_rows_earliest_first_and_leases_them(orch: Orchestrator) -> None:
    """A claim leases up to ``limit`` due rows, earliest due first; leased rows wait for the lease to end."""
    started(orch, "a", "b", "c")
    now = datetime.now(UTC)
    first = index(orch).claim("w1", now, now + LATER, 2)
    assert [c.saga_uuid for c in first] == [aggregate_id("a"), aggregate_id("b")]
    assert [c.version for c in first] == [1, 1]
    assert [c.saga_uuid for c in index(orch).claim("w2", now, now + LATER, 10)] == [aggregate_id("c")]
    assert index(orch).claim("w2", now, now + LATER, 10) == []
    after_lease = now + LATER + timedelta(seconds=1)
    retaken = index(orch).claim("w3", after_lease, after_lease + LATER, 10)
    assert {c.saga_uuid for c in retaken} == {aggregate_id(x) for x in "abc"}


def test_claim_loaded_returns_the_claimed_histories(orch: Orchestrator) -> None:
    """claim_loaded gives each claimed saga's events, ordered by saga then version."""
    started(orch, "a", "b")
    now = datetime.now(UTC)
    claims, events = index(orch).claim_loaded("w", now, now + LATER, 10)
    assert {c.saga_uuid for c in claims} == {aggregate_id("a"), aggregate_id("b")}
    assert sorted((e.originator_id, e.originator_version) for e in events) == sorted((aggregate_id(x), 1) for x in "ab")


def test_a_row_not_yet_due_is_not_claimed(orch: Orchestrator) -> None:
    """A saga with a later start is claimed only once its time has come."""
    orch.start(Ship, {"item": "x"}, saga_id="later", start_at=datetime.now(UTC) + LATER)
    now = datetime.now(UTC)
    assert index(orch).claim("w", now, now + LATER, 10) == []
    due = now + LATER + timedelta(seconds=1)
    assert len(index(orch).claim("w", due, due + LATER, 10)) == 1


def test_release_hands_a_row_back_only_at_its_version(orch: Orchestrator) -> None:
    """release() sets due_at and clears the lease if the version matches; a stale one changes nothing;
    due_at None removes the row."""
    started(orch, "a")
    now = datetime.now(UTC)
    (claim,) = index(orch).claim("w", now, now + LATER, 1)
    index(orch).release(claim.saga_uuid, claim.version + 1, now)  # stale: ignored
    assert index(orch).claim("w", now, now + LATER, 1) == []
    later = now + timedelta(seconds=5)
    index(orch).release(claim.saga_uuid, claim.version, later)
    assert index(orch).claim("w", now, now + LATER, 1) == []  # not due before `later`
    assert len(index(orch).claim("w", later, later + LATER, 1)) == 1
    index(orch).release(claim.saga_uuid, claim.version, None)
    assert index(orch).next_due() is None


def test_next_due_counts_a_leased_row_at_its_lease_end(orch: Orchestrator) -> None:
    """next_due is the earliest due time, a leased row's lease end standing in for its due time."""
    assert index(orch).next_due() is None
    started(orch, "a")
    now = datetime.now(UTC)
    due = index(orch).next_due()
    assert due is not None
    assert due <= now
    index(orch).claim("w", now, now + LATER, 1)
    leased = index(orch).next_due()
    assert leased is not None
    assert abs((leased - (now + LATER)).total_seconds()) < 0.01


def test_status_rows_never_go_back_a_version(orch: Orchestrator) -> None:
    """write_status rewrites an equal version, never replaces a later one with an earlier one; reset empties."""
    (saga_id,) = started(orch, "a")
    uuid = aggregate_id(saga_id)
    old = index_entry(orch.repository.load(uuid))
    orch.cancel(saga_id, "stop")
    current = index(orch).get_status(uuid)
    index(orch).write_status([old], None)
    assert index(orch).get_status(uuid) == current
    assert orch.status(saga_id).state.value == "compensating"
    newest = index_entry(orch.repository.load(uuid))
    index(orch).write_status([newest], None)
    assert orch.status(saga_id).version == newest.version
    index(orch).write_status([], None, reset=True)
    assert index(orch).get_status(uuid) is None
    assert orch.list() == []


def test_list_filters_and_orders_by_last_update(orch: Orchestrator) -> None:
    """list_status filters by state and saga and returns the most recently updated first, up to limit."""
    started(orch, "a", "b", "c")
    orch.cancel("b")
    assert len(index(orch).list_status(StatusQuery(), 10)) == 3
    assert [s.saga_id for s in orch.list()] == ["b", "c", "a"]
    assert [s.saga_id for s in orch.list(state="pending")] == ["c", "a"]
    assert [s.saga_id for s in orch.list(state="compensating", saga="Ship")] == ["b"]
    assert [s.saga_id for s in orch.list(limit=1)] == ["b"]


def test_set_aside_backs_off_and_shows_its_problem_until_the_next_save(orch: Orchestrator) -> None:
    """set_aside defers the row 5 s, then 10 s, notes the problem in the status, and ignores a stale version;
    the saga's next save clears it."""
    (saga_id,) = started(orch, "a")
    uuid, now = aggregate_id(saga_id), datetime.now(UTC)
    first = index(orch).set_aside(uuid, 1, "broken", now)
    second = index(orch).set_aside(uuid, 1, "still broken", now)
    assert first is not None
    assert second is not None
    assert round((first - now).total_seconds()) == 5
    assert round((second - now).total_seconds()) == 10
    assert index(orch).set_aside(uuid, 7, "stale", now) is None
    assert orch.status(saga_id).problem == "still broken"
    assert [s.problem for s in orch.list()] == ["still broken"]
    orch.cancel(saga_id)
    assert orch.status(saga_id).problem is None


def test_the_tracking_position_only_moves_forwards(orch: Orchestrator) -> None:
    """Saves advance the status position; an explicit earlier position does not move it back."""
    started(orch, "a", "b")
    position = index(orch).status_position()
    assert position is not None
    assert position >= 2
    index(orch).write_status([], position - 1)
    assert index(orch).status_position() == position
    index(orch).write_status([], position + 5)
    assert index(orch).status_position() == position + 5


def test_events_of_many_sagas_in_one_read(orch: Orchestrator) -> None:
    """select_events_many returns the events of every saga asked for, by saga then version."""
    started(orch, "a", "b")
    orch.cancel("a")
    events = index(orch).select_events_many([aggregate_id("a"), aggregate_id("b")])
    keys = [(e.originator_id, e.originator_version) for e in events]
    assert keys == sorted(keys)
    assert {(aggregate_id("a"), 2), (aggregate_id("b"), 1)} <= set(keys)
    assert index(orch).select_events_many([]) == []


def test_first_events_of_many_sagas_in_one_read(orch: Orchestrator) -> None:
    """select_events_many(first_only=True) returns each saga's first event (its start) and no other."""
    started(orch, "a", "b")
    orch.cancel("a")
    events = index(orch).select_events_many([aggregate_id("a"), aggregate_id("b")], first_only=True)
    assert sorted((UUID(str(e.originator_id)), e.originator_version) for e in events) == sorted(
        [(aggregate_id("a"), 1), (aggregate_id("b"), 1)]
    )
    assert {e.topic for e in events} == {SagaStarted.topic}


class Flaky(ThreadWaker):
    """A waker whose first two watches fail, then watches until stopped."""

    errors = (OSError,)

    def __init__(self, wake: threading.Event) -> None:
        super().__init__(wake.set)
        self.tries = 0

    def watch_once(self) -> None:
        self.tries += 1
        if self.tries <= 2:
            raise OSError("connection reset")
        self.stopping.wait()


def test_a_waker_that_fails_wakes_the_worker_and_watches_again() -> None:
    """A watch that fails wakes the worker (so polling covers the gap) and starts again."""
    woke = threading.Event()
    waker = Flaky(woke)
    waker.retry_pause = 0.01
    waker.start()
    deadline = time.monotonic() + 5
    while waker.tries < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    waker.stopping.set()
    waker.thread.join(5)
    assert woke.is_set()
    assert waker.tries == 3
    assert not waker.thread.is_alive()


def test_the_sqlite_watcher_survives_a_file_that_is_not_there_yet(tmp_path: Path) -> None:
    """The SQLite watcher keeps trying after an error and then wakes on another connection's commit."""
    path = tmp_path / "later" / "sagas.db"
    woke = threading.Event()
    watcher = DataVersionWatcher(str(path), "stored_events", woke.set, lambda: 0, interval=0.01)
    watcher.start()
    try:
        time.sleep(0.2)  # the directory does not exist: connecting fails, the watcher wakes and retries
        assert woke.is_set()
        woke.clear()
        path.parent.mkdir()
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE stored_events (x)")
        time.sleep(1.5)  # the watcher reconnects within its one-second pause
        woke.clear()
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO stored_events VALUES (1)")
        assert woke.wait(3)
    finally:
        watcher.stop()
    assert not watcher.thread.is_alive()


@pytest.mark.postgres
def test_the_postgres_listener_reconnects_after_its_connection_is_killed(pg_url: str) -> None:
    """A Listener whose connection the server terminates listens again and wakes on another writer's events."""
    import psycopg

    with Orchestrator(sagas=[Ship], database=pg_url) as listening, Orchestrator(sagas=[Ship], database=pg_url) as other:
        woke = threading.Event()
        waker = index(listening).waker(woke.set)
        assert waker is not None
        waker.start()
        try:
            time.sleep(0.3)
            with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            time.sleep(1.5)  # it wakes on the error, pauses a second and listens again
            woke.clear()
            other.start(Ship, {"item": "x"})
            assert woke.wait(5)
        finally:
            waker.stop()
