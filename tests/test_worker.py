"""Worker behaviour: batches, conflicts, stopping, and wake-ups."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import IntegrityError, OperationalError
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
        original = orch.repository.save
        interfered: list[str] = []

        def save(aggregates: list[Any], **options: Any) -> None:
            if len(aggregates) > 1 and not interfered:
                interfered.append(ids[2])
                orch.cancel(ids[2], "operator")  # lands first: this batch now holds a stale saga
            original(aggregates, **options)

        monkeypatch.setattr(orch.repository, "save", save)
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


def test_worker_wakes_on_another_writer_not_on_polling(durable_url: str) -> None:
    """A worker polling every 30 s still wakes at once for another writer's saga (NOTIFY / data_version)."""
    with Orchestrator(sagas=[Flaky], database=durable_url, settings=Settings.defaults()) as worker_side:
        worker = Worker(worker_side, poll_interval=30)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            time.sleep(0.5)  # the worker is idle, sleeping on its 30 s poll
            with Orchestrator(sagas=[Flaky], database=durable_url, settings=Settings.defaults()) as client:
                started = time.monotonic()
                saga_id = client.start(Flaky, {"n": 1})
                status = client.wait(saga_id, timeout=10)
                elapsed = time.monotonic() - started
        finally:
            worker.stop()
            thread.join(10)
    assert status.state is SagaState.COMPLETED
    assert elapsed < 5


class Stuck:
    """A side task of its own thread that hangs (a receiver that never answers, say) until released."""

    name = "stuck"
    own_thread = True

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self) -> float:
        self.entered.set()
        self.release.wait(30)
        return 60.0


def test_a_hanging_side_task_does_not_hold_up_the_sagas_steps(database_url: str) -> None:
    """A side task of its own thread (notification deliveries) that hangs delays no saga's steps."""
    stuck = Stuck()
    with Orchestrator(sagas=[Flaky], database=database_url) as orch:
        worker = Worker(orch, poll_interval=0.05, side_tasks=[stuck])
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            assert stuck.entered.wait(10)
            saga_id = orch.start(Flaky, {"n": 1})
            status = orch.wait(saga_id, timeout=5)
        finally:
            stuck.release.set()
            worker.stop()
            thread.join(10)
    assert status.state is SagaState.COMPLETED
    assert not thread.is_alive()


class Once(Saga[Item]):
    runs: ClassVar[list[tuple[str, int]]] = []

    @step
    def charge(self, item: Item) -> int:
        Once.runs.append(("charge", self.attempt))
        return item.n

    @step
    def ship(self, item: Item) -> int:
        Once.runs.append(("ship", self.attempt))
        return item.n


def test_a_save_that_landed_but_reported_a_conflict_still_runs_its_step(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost commit acknowledgement (saved, then reported as a conflict) does not strand the claimed step."""
    Once.runs = []
    with Orchestrator(sagas=[Once], database=database_url) as orch:
        saga_id = orch.start(Once, {"n": 1})
        original = orch.repository.save
        lost: list[int] = []

        def save(aggregates: list[Any], **options: Any) -> None:
            original(aggregates, **options)  # it landed...
            if not lost:
                lost.append(1)
                raise IntegrityError("duplicate key (the library's retry after a lost acknowledgement)")

        monkeypatch.setattr(orch.repository, "save", save)
        (status,) = drain(orch, saga_id)
        history = orch.history(saga_id)
    assert lost == [1]
    assert status.state is SagaState.COMPLETED
    assert Once.runs == [("charge", 1), ("ship", 1)]
    assert not [e for e in history if e.type == "StepAttemptFailed"]


def test_a_storage_error_keeps_finished_outcomes_for_the_next_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OperationalError while recording outcomes neither stops the worker nor re-runs the finished steps."""
    Once.runs = []
    with Orchestrator(sagas=[Once], database="memory://") as orch:
        ids = [orch.start(Once, {"n": n}) for n in range(3)]
        original = orch.repository.save
        calls: list[int] = []

        def save(aggregates: list[Any], **options: Any) -> None:
            calls.append(1)
            if len(calls) == 2:  # the first batch of outcomes
                raise OperationalError("canceling statement due to lock timeout")
            original(aggregates, **options)

        monkeypatch.setattr(orch.repository, "save", save)
        statuses = drain(orch, *ids)
    assert [s.state for s in statuses] == [SagaState.COMPLETED] * 3
    assert sorted(Once.runs) == sorted([("charge", 1), ("ship", 1)] * 3)


class Sleepy(Saga[Item]):
    live = 0
    peak = 0
    attempts: ClassVar[list[int]] = []
    lock = threading.Lock()

    @step(timeout=0.1, retry={"max_attempts": 3, "initial_interval": 0.01, "max_interval": 0.01})
    def slow(self, item: Item) -> str:
        with Sleepy.lock:
            Sleepy.attempts.append(self.attempt)
            Sleepy.live += 1
            Sleepy.peak = max(Sleepy.peak, Sleepy.live)
        time.sleep(0.4 if self.attempt == 1 else 0)
        with Sleepy.lock:
            Sleepy.live -= 1
        return "done"


def test_a_timed_out_thread_never_overlaps_the_retry_of_its_step() -> None:
    """A `def` step past its timeout keeps its thread; its retry waits for that thread instead of running beside it."""
    Sleepy.attempts, Sleepy.peak = [], 0
    with Orchestrator(sagas=[Sleepy], database="memory://") as orch:
        saga_id = orch.start(Sleepy, {"n": 1})
        worker = Worker(orch, poll_interval=0.02)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            status = orch.wait(saga_id, timeout=10)
        finally:
            worker.stop()
            thread.join(10)
    assert status.state is SagaState.COMPLETED
    assert Sleepy.attempts == [1, 2]
    assert Sleepy.peak == 1


def test_logs_say_how_bad_each_outcome_is(database_url: str) -> None:
    """A retried attempt logs a warning, the final failure an error with its traceback, each saga's end
    one info line; no line carries ``error=None``."""
    from structlog.testing import capture_logs

    from orchestrator import RetryPolicy

    class Boom(Saga[Item]):
        @step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.01))
        def explode(self, item: Item) -> None:
            if item.n:
                raise RuntimeError("kaboom")

    with Orchestrator(sagas=[Boom], database=database_url) as orch, capture_logs() as logs:
        ok, bad = orch.start(Boom, {"n": 0}), orch.start(Boom, {"n": 1})
        drain(orch, ok, bad)
        failed = next(e for e in orch.history(bad) if e.type == "StepFailed")
    retried = [line for line in logs if line["event"] == "step attempt failed; retrying later"]
    final = [line for line in logs if line["event"] == "step failed for good"]
    ends = [(line["event"], line["saga_id"]) for line in logs if line["event"].startswith("saga ")]
    assert [(line["log_level"], line["error"]) for line in retried] == [("warning", "RuntimeError: kaboom")]
    assert [line["log_level"] for line in final] == ["error"]
    assert isinstance(final[0]["exc_info"], RuntimeError)
    assert sorted(ends) == sorted([("saga completed", ok), ("saga compensated", bad)])
    assert all(line.get("error", "") is not None for line in logs)
    assert "Traceback" in failed.data["traceback"]
    assert "kaboom" in failed.data["traceback"]


class Two(Saga[Item]):
    @step
    def one(self, item: Item) -> int:
        return item.n

    @step
    def two(self, item: Item) -> int:
        return item.n + 1


def test_an_idle_postgres_worker_claims_and_starts_a_step_in_one_transaction(pg_url: str) -> None:
    """On PostgreSQL an idle worker's claim and the first step's start are one transaction, not two."""
    with Orchestrator(sagas=[Two], database=pg_url) as orch:
        saga_id = orch.start(Two, {"n": 1})
        worker = Worker(orch, poll_interval=0.01)
        worker.run(drain=True)
        status = orch.status(saga_id)
    assert status.state is SagaState.COMPLETED
    # One claim (that also saved the first StepStarted), then one save per outcome (each with the
    # next step's start): two saves, where claiming apart would have taken three.
    assert worker.stats["saves"] == 2
    assert worker.stats["batch_errors"] == 0


def test_a_failed_one_transaction_claim_is_undone_whole_and_claimed_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the claim-and-save transaction fails, its claim is undone too: the saga is claimed at once the
    two-transaction way, not left leased until the lease runs out."""
    from eventsourcing.persistence import DataError

    from orchestrator.storage.postgres import PostgresIndexRecorder

    insert = PostgresIndexRecorder._insert_stored_events
    failed: list[int] = []

    def refuse_once(self: Any, curs: Any, stored: Any, **kwargs: Any) -> None:
        if not failed:
            failed.append(1)
            raise DataError("refused once")
        insert(self, curs, stored, **kwargs)

    with Orchestrator(sagas=[Two], database=pg_url, settings=Settings.defaults()) as orch:
        saga_id = orch.start(Two, {"n": 1})
        monkeypatch.setattr(PostgresIndexRecorder, "_insert_stored_events", refuse_once)
        worker = Worker(orch, poll_interval=0.01, lease_seconds=600)
        started = time.monotonic()
        worker.run(drain=True)
        took = time.monotonic() - started
        status = orch.status(saga_id)
    assert failed == [1]
    assert worker.stats["batch_errors"] == 1
    assert status.state is SagaState.COMPLETED
    assert took < 10  # not after a 600 s lease


def test_an_idle_worker_claims_apart_while_another_writer_holds_the_events_table(pg_url: str) -> None:
    """When another writer holds the events table, the claim commits alone (it never waits for the
    table while holding its rows) and the first step's start is saved apart, once the table is free."""
    import psycopg

    with Orchestrator(sagas=[Two], database=pg_url) as orch:
        saga_id = orch.start(Two, {"n": 1})
        recorder: Any = orch.repository.store.recorder
        events = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
        work = f'"{recorder.datastore.schema}".saga_work'
        holder = psycopg.connect(pg_url.split("?")[0])
        holder.execute(f"LOCK TABLE {events} IN EXCLUSIVE MODE")
        worker = Worker(orch, poll_interval=0.01)
        thread = threading.Thread(target=worker.run, kwargs={"drain": True})
        thread.start()
        time.sleep(0.5)  # the claim is in; the save of the first step's start waits for the table
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as reader:
            row = reader.execute(f"SELECT lease_owner FROM {work}").fetchone()
        holder.rollback()
        holder.close()
        thread.join(20)
        status = orch.status(saga_id)
    assert row is not None
    assert row[0] == worker.worker_id  # the claim committed on its own
    assert status.state is SagaState.COMPLETED
    assert worker.stats["saves"] == 3  # the first step's start, then each outcome
