"""Worker behaviour: batches, conflicts, stopping, and wake-ups."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import NonRetryable, Orchestrator, SagaState, Settings, step
from orchestrator.definition import Saga
from orchestrator.worker import Worker
from tests.conftest import drain


class Item(BaseModel):
    n: int


class Flaky(Saga[Item]):
    @step
    def one(self, item: Item) -> int:
        if item.n == 3:
            raise NonRetryable("item 3 is broken")
        return item.n

    @one.compensate
    def undo_one(self, item: Item, result: int) -> None:
        pass

    @step
    def two(self, item: Item) -> int:
        return self.results["one"] * 2


def test_one_failing_saga_does_not_hold_up_its_batch(database_url: str) -> None:
    """In one batch, the saga whose step fails for good compensates and the others complete."""
    with Orchestrator(sagas=[Flaky], database=database_url) as orch:
        ids = [orch.start(Flaky, {"n": n}) for n in range(8)]
        statuses = drain(orch, *ids)
    states = [s.state for s in statuses]
    assert states == [SagaState.COMPLETED] * 3 + [SagaState.COMPENSATED] + [SagaState.COMPLETED] * 4


def test_conflict_in_a_batch_is_redone_for_each_saga_alone(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch save that conflicts (a saga was cancelled meanwhile) is redone saga by saga, nothing twice."""
    with Orchestrator(sagas=[Flaky], database=database_url) as orch:
        ids = [orch.start(Flaky, {"n": n + 10}) for n in range(5)]
        original = orch.save
        interfered: list[str] = []

        def save(aggregates: list[Any], **options: Any) -> None:
            if len(aggregates) > 1 and not interfered:
                interfered.append(ids[2])
                orch.cancel(ids[2], "operator")  # lands first: this batch now holds a stale saga
            original(aggregates, **options)

        monkeypatch.setattr(orch, "save", save)
        statuses = drain(orch, *ids)
        histories = [orch.history(saga_id) for saga_id in ids]
    assert interfered == [ids[2]]
    assert [s.state for s in statuses] == [SagaState.COMPLETED] * 2 + [SagaState.CANCELLED] + [SagaState.COMPLETED] * 2
    for history in histories:
        outcomes = Counter((e.type, e.step) for e in history if e.type.endswith("Succeeded"))
        assert all(count == 1 for count in outcomes.values()), outcomes


class Gate(Saga[Item]):
    entered = threading.Event()
    release = threading.Event()

    @step
    def hold(self, item: Item) -> str:
        Gate.entered.set()
        Gate.release.wait(10)
        return "held"

    @step
    def after(self, item: Item) -> str:
        return "after"


def test_stopping_worker_finishes_the_attempt_in_hand_and_starts_no_other(tmp_path: Any) -> None:
    """A stopped worker records the running step's outcome, then exits without starting the next step."""
    Gate.entered.clear()
    Gate.release.clear()
    with Orchestrator(sagas=[Gate], database=f"sqlite:///{tmp_path / 'stop.db'}") as orch:
        saga_id = orch.start(Gate, {"n": 1})
        worker = Worker(orch, poll_interval=0.05)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        assert Gate.entered.wait(10)
        worker.stop()
        Gate.release.set()
        thread.join(10)
        assert not thread.is_alive()
        status = orch.status(saga_id)
    assert [(s.name, s.state.value) for s in status.steps] == [("hold", "succeeded"), ("after", "pending")]
    assert status.state is SagaState.RUNNING


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A database two orchestrators (as two processes would) can share: a SQLite file or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_worker_wakes_on_another_writer_not_on_polling(shared_url: str) -> None:
    """A worker polling every 30 s still wakes at once for another writer's saga (NOTIFY / data_version)."""
    with Orchestrator(sagas=[Flaky], database=shared_url, settings=Settings.defaults()) as worker_side:
        worker = Worker(worker_side, poll_interval=30)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            time.sleep(0.5)  # the worker is idle, sleeping on its 30 s poll
            with Orchestrator(sagas=[Flaky], database=shared_url, settings=Settings.defaults()) as client:
                started = time.monotonic()
                saga_id = client.start(Flaky, {"n": 1})
                status = client.wait(saga_id, timeout=10)
                elapsed = time.monotonic() - started
        finally:
            worker.stop()
            thread.join(10)
    assert status.state is SagaState.COMPLETED
    assert elapsed < 5
