"""Listing, paging, counting and time travel, on every backend: the filters of the HTTP list in Python."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import (
    DefinitionError,
    InvalidInput,
    Orchestrator,
    RetryPolicy,
    Saga,
    SagaNotFound,
    SagaState,
    step,
    wait_for,
)
from tests.conftest import drain


class Claim(BaseModel):
    employee: str
    amount: float = 10.0
    urgent: bool = False
    tags: list[str] = []


class Expense(Saga[Claim]):
    search = ["employee", "urgent", "tags"]

    @step
    def file(self, claim: Claim) -> str:
        return "filed"

    approval = wait_for("approved")

    @step(retry=RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.02))
    def pay(self, claim: Claim) -> None:
        if claim.amount > 1000:
            raise RuntimeError("over budget")


def test_pages_cover_every_saga_once_in_order(database_url: str) -> None:
    """Keyset pages of 3 return every saga exactly once, newest update first, and end with no cursor."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch:
        ids = [orch.start(Expense, {"employee": f"e{i}"}, saga_id=f"s{i:02}") for i in range(10)]
        seen: list[str] = []
        cursor = None
        while True:
            page = orch.page(limit=3, cursor=cursor)
            assert len(page.items) <= 3
            seen += [s.saga_id for s in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids)
        assert len(seen) == len(set(seen))
        updated = [orch.status(s).updated_at for s in seen]
        assert updated == sorted(updated, reverse=True)
        assert [s.saga_id for s in orch.list()] == seen  # list() is all of them: no silent cap
        assert len(orch.list(limit=4)) == 4


def test_filters_by_state_time_and_search_attributes(database_url: str) -> None:
    """State, saga, created/updated ranges and the saga's declared search fields all filter the list."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch:
        orch.start(Expense, {"employee": "ada", "urgent": True, "tags": ["a", "b"]}, saga_id="ada-1")
        orch.start(Expense, {"employee": "ada"}, saga_id="ada-2")
        time.sleep(0.01)
        middle = datetime.now(UTC)
        time.sleep(0.01)
        orch.start(Expense, {"employee": "bob"}, saga_id="bob-1")
        drain_until_waiting(orch, "ada-1", "ada-2", "bob-1")
        orch.send("ada-2", "approved")
        drain(orch, "ada-2")

        def ids(**filters: Any) -> list[str]:
            return sorted(s.saga_id for s in orch.list(**filters))

        assert ids(search={"employee": "ada"}) == ["ada-1", "ada-2"]
        assert ids(search={"employee": "ada", "urgent": True}) == ["ada-1"]
        assert ids(search={"tags": '["a","b"]'}) == ["ada-1"]
        assert ids(search={"employee": "nobody"}) == []
        assert ids(state="waiting") == ["ada-1", "bob-1"]
        assert ids(state="completed", saga="Expense") == ["ada-2"]
        assert ids(created_before=middle) == ["ada-1", "ada-2"]
        assert ids(created_after=middle) == ["bob-1"]
        assert ids(updated_after=middle, state="completed") == ["ada-2"]
        assert ids(updated_before=middle) == []
        counts = orch.counts()
        assert counts == {"Expense": {"completed": 1, "waiting": 2}}
        assert orch.counts(search={"employee": "ada"}) == {"Expense": {"completed": 1, "waiting": 1}}


def drain_until_waiting(orch: Orchestrator, *saga_ids: str) -> None:
    deadline = time.monotonic() + 10
    while not all(orch.status(s).state is SagaState.WAITING for s in saga_ids):
        assert time.monotonic() < deadline
        orch.run_worker(wait=False, poll_interval=0.01)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"state": "sleeping"}, "unknown state"),
        ({"created_after": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"search": {"em ployee": "x"}}, "field name"),
        ({"search": {"employee": ["x"]}}, "string, number or boolean"),
        ({"colour": "red"}, "unknown filter"),
        ({"cursor": "not-a-cursor"}, "not a cursor"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(database_url: str, filters: dict[str, Any], message: str) -> None:
    """A bad filter or cursor raises InvalidInput naming what is wrong."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch, pytest.raises(InvalidInput, match=message):
        orch.page(**filters)


def test_status_at_travels_back_through_the_history(database_url: str) -> None:
    """status_at(id, when) is the status the saga had then, folded from its events."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch:
        saga_id = orch.start(Expense, {"employee": "ada"})
        started = orch.status(saga_id).created_at
        drain_until_waiting(orch, saga_id)
        waiting_since = datetime.now(UTC)
        orch.send(saga_id, "approved")
        (done,) = drain(orch, saga_id)
        assert orch.status_at(saga_id, started).state is SagaState.PENDING
        assert orch.status_at(saga_id, waiting_since).state is SagaState.WAITING
        assert orch.status_at(saga_id, datetime.now(UTC)) == done
        with pytest.raises(SagaNotFound, match="started after"):
            orch.status_at(saga_id, started - timedelta(seconds=1))
        with pytest.raises(InvalidInput):
            orch.status_at(saga_id, datetime.now())


def test_timeline_shows_every_attempt_with_timing_worker_and_error(database_url: str) -> None:
    """The timeline lists each attempt of each step and each wait, with start, end, worker and outcome."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch:
        saga_id = orch.start(Expense, {"employee": "ada", "amount": 5000})
        drain_until_waiting(orch, saga_id)
        orch.send(saga_id, "approved")
        drain(orch, saga_id)
        timeline = orch.timeline(saga_id)
    rows = [(e.kind, e.name, e.attempt, e.outcome) for e in timeline]
    assert rows == [
        ("step", "file", 1, "succeeded"),
        ("wait", "approved", 1, "received"),
        ("step", "pay", 1, "retrying"),
        ("step", "pay", 2, "retrying"),
        ("step", "pay", 3, "failed"),
    ]
    for entry in timeline:
        assert entry.ended_at is not None
        assert entry.duration_ms is not None
        assert entry.duration_ms >= 0
    failed = [e for e in timeline if e.name == "pay"]
    assert all("over budget" in (e.error or "") for e in failed)
    assert all(e.worker for e in timeline if e.kind == "step")


def test_search_fields_must_be_input_fields() -> None:
    """A saga declaring a search field its input model lacks is refused at class creation."""
    with pytest.raises(DefinitionError, match="not fields: 'salary'"):

        class Bad(Saga[Claim]):
            search = ["employee", "salary"]

            @step
            def one(self, claim: Claim) -> None: ...


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://", "https://exa\nmple.com/", "x" * 10])
def test_a_bad_notification_url_is_refused(database_url: str, url: str) -> None:
    """start(notify=...) takes an http(s) URL with a host and no control characters, and writes nothing else."""
    with Orchestrator(sagas=[Expense], database=database_url) as orch:
        with pytest.raises(InvalidInput, match="URL"):
            orch.start(Expense, {"employee": "ada"}, notify=url)
        assert orch.list() == []
