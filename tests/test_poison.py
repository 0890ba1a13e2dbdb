"""One bad saga never harms another: poison input, unstorable outputs, broken histories, storage faults.

Every test runs on memory, SQLite and PostgreSQL. Good sagas started beside the poison ones
must complete with exactly one attempt per step; the poison ones are refused at start, or
end with the cause in their history, or are set aside (status ``problem``) with backoff.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from eventsourcing.persistence import DataError, OperationalError, StoredEvent

from orchestrator import InvalidInput, NonRetryable, Orchestrator, Saga, SagaState, Settings, step
from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.worker import Worker
from tests.conftest import drain
from tests.poison_app import Item, Pick, calls


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def start_good(orch: Orchestrator, prefix: str, n: int = 5) -> list[str]:
    return [orch.start(Pick, {"name": f"good-{i}"}, saga_id=f"{prefix}-good-{i}") for i in range(n)]


def assert_completed_once(orch: Orchestrator, saga_ids: list[str]) -> None:
    """Each saga completed and each of its steps ran exactly once."""
    for saga_id in saga_ids:
        status = orch.status(saga_id)
        assert status.state is SagaState.COMPLETED, (saga_id, status.state, status.error, status.problem)
        assert [s.attempts for s in status.steps] == [1, 1, 1], saga_id
        assert [calls[(saga_id, s)] for s in ("pick", "pack", "ship")] == [1, 1, 1], saga_id


POISON_INPUTS = [
    pytest.param({"name": "a\x00b"}, "NUL", id="nul-string"),
    pytest.param({"name": "\ud800"}, "surrogate", id="lone-surrogate"),
    pytest.param({"weight": math.nan}, "not a finite number", id="nan"),
    pytest.param({"weight": math.inf}, "not a finite number", id="infinity"),
    pytest.param({"count": 2**70}, "64-bit", id="huge-int"),
    pytest.param({"name": "x" * (1 << 20)}, "limit", id="over-1-mib"),
]


@pytest.mark.parametrize(("data", "message"), POISON_INPUTS)
def test_unstorable_input_is_refused_and_writes_nothing(database_url: str, data: dict[str, Any], message: str) -> None:
    """start() refuses input that would not round-trip through storage, names why, and writes nothing."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        with pytest.raises(InvalidInput, match=message) as caught:
            orch.start(Pick, data, saga_id="poison")
        assert len(str(caught.value)) < 400  # quotes no more than a short prefix of the value
        assert orch.list() == []


def test_poison_batch_leaves_good_sagas_alone(database_url: str) -> None:
    """Beside every kind of poison saga, good sagas complete with one attempt per step; each poison
    saga ends compensated with its cause in the history."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        good = start_good(orch, "batch")
        poison = {
            kind: orch.start(Pick, {"output": kind}, saga_id=f"batch-{kind}")
            for kind in ("nul", "nan", "huge", "emit-nul")
        }
        good += start_good(orch, "batch-late")
        drain(orch, *good, *poison.values())
        assert_completed_once(orch, good)
        for kind, saga_id in poison.items():
            status = orch.status(saga_id)
            assert status.state is SagaState.COMPENSATED, kind
            assert calls[(saga_id, "pick")] == 1, "an unstorable output is not retried"
            (failed,) = [e for e in orch.history(saga_id) if e.type == "StepFailed"]
            assert "cannot be stored" in failed.data["error"], kind
            assert "cannot be stored" in (status.error or "")


def test_stored_input_that_no_longer_validates_fails_its_saga_only(database_url: str) -> None:
    """A saga whose stored input the code's model now rejects fails without running a step; others complete."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        good = start_good(orch, "stale")
        # What an older version of the code may have stored: a name that is not a string.
        orch.repository.save([SagaAggregate.start(Pick, "stale-input", {"name": 42}, datetime.now(UTC), None)])
        drain(orch, *good, "stale-input")
        assert_completed_once(orch, good)
        status = orch.status("stale-input")
        assert status.state is SagaState.COMPENSATED
        assert "cannot start" in (status.error or "")
        assert calls[("stale-input", "pick")] == 0


def corrupt_first_event(orch: Orchestrator, saga_id: str) -> None:
    """Overwrite a saga's SagaStarted with data the current code cannot load (as after a bad migration)."""
    uuid, bad = aggregate_id(saga_id), b'{"timestamp": "not a time"}'
    if orch.database.kind == "memory":
        recorder: Any = orch.store.recorder
        position = recorder._stored_events_index[str(uuid)][1]
        old = recorder._stored_events[position]
        recorder._stored_events[position] = StoredEvent(old.originator_id, 1, old.topic, bad)
    elif orch.database.kind == "sqlite":
        with orch.store.recorder.datastore.transaction(commit=True) as cursor:  # type: ignore[attr-defined]
            cursor.execute(
                "UPDATE stored_events SET state = ? WHERE originator_id = ? AND originator_version = 1", (bad, uuid.hex)
            )
    else:
        recorder = orch.store.recorder
        with recorder.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                f"UPDATE {recorder.datastore.schema}.{recorder.events_table_name} SET state = %s"
                " WHERE originator_id = %s AND originator_version = 1",
                (bad, uuid),
            )


def test_unloadable_history_is_set_aside_with_backoff(database_url: str) -> None:
    """A saga whose history cannot be loaded is set aside (status problem, due later), others complete."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        good = start_good(orch, "broken")
        orch.start(Pick, {}, saga_id="broken-history")
        corrupt_first_event(orch, "broken-history")
        good += start_good(orch, "broken-late")
        drain(orch, *good)
        assert_completed_once(orch, good)
        status = orch.status("broken-history")
        assert status.state is SagaState.PENDING
        assert status.problem is not None
        assert "history cannot be loaded" in status.problem
        due = orch.store.index.next_due()
        assert due is not None
        assert (due - datetime.now(UTC)).total_seconds() > 2  # backoff: not retried in a hot loop
        claims, _ = orch.store.index.claim_loaded("someone", datetime.now(UTC), datetime.now(UTC), 10)
        assert claims == []


def test_a_saga_whose_outcome_the_database_refuses_fails_alone(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the database refuses one saga's events in a batch, the rest of the batch is recorded and
    that saga's attempt fails for good with the database's reason."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        good = start_good(orch, "refused", 8)
        victim = orch.start(Pick, {"name": "victim"}, saga_id="refused-victim")
        real = orch.store.save_sagas
        refused = Counter[str]()

        def save_sagas(aggregates: list[Any], index: list[Any]) -> None:
            for aggregate in aggregates:
                kinds = {type(e).__name__ for e in aggregate.pending_events}
                if aggregate.run.saga_id == victim and "StepSucceeded" in kinds:
                    refused["times"] += 1
                    raise DataError("value too long for type character varying(3)")
            real(aggregates, index)

        monkeypatch.setattr(orch.store, "save_sagas", save_sagas)
        drain(orch, *good, victim)
        assert_completed_once(orch, good)
        assert refused["times"] >= 1
        status = orch.status(victim)
        assert status.state is SagaState.COMPENSATED
        assert "could not be stored" in (status.error or "")
        assert "value too long" in (status.error or "")
        assert calls[(victim, "pick")] == 1


def test_transient_storage_errors_back_off_and_lose_no_outcome(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose saves fail for a while (database away) backs off, then records every outcome
    it held: no step runs twice and none is counted as lost."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        good = start_good(orch, "away", 4)
        real = orch.store.save_sagas
        failures = Counter[str]()

        def save_sagas(aggregates: list[Any], index: list[Any]) -> None:
            finishing = any(type(e).__name__ == "StepSucceeded" for a in aggregates for e in a.pending_events)
            if finishing and failures["n"] < 3:
                failures["n"] += 1
                raise OperationalError("server closed the connection unexpectedly")
            real(aggregates, index)

        monkeypatch.setattr(orch.store, "save_sagas", save_sagas)
        worker = Worker(orch, poll_interval=0.01)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not all(orch.status(s).state.terminal for s in good):
                assert time.monotonic() < deadline, "sagas did not finish after the outage"
                time.sleep(0.02)
        finally:
            worker.stop()
            thread.join(10)
        assert not thread.is_alive()
        assert failures["n"] == 3
        assert worker.stats["errors"] == 3
        assert_completed_once(orch, good)


def test_worker_stops_within_its_grace_period_while_rounds_keep_failing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() ends a worker promptly even while every round fails (storage gone for good)."""
    settings = Settings.defaults().model_copy(update={"shutdown_grace": 1.0})
    with Orchestrator(sagas=[Pick], database=database_url, settings=settings) as orch:
        start_good(orch, "gone", 3)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OperationalError("could not connect to server")

        monkeypatch.setattr(orch.store.index, "claim_loaded", broken)
        monkeypatch.setattr(orch.store.index, "next_due", broken)
        worker = Worker(orch, poll_interval=0.01)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()
        begun = time.monotonic()
        worker.stop()
        thread.join(10)
        assert not thread.is_alive()
        assert time.monotonic() - begun < 2
        assert worker.stats["errors"] >= 2
        assert worker.stats["errors"] < 12  # backoff, not a hot loop: 0.5 s of doubling pauses


def test_stopping_worker_leaves_a_hung_step_to_its_lease_after_the_grace_period(database_url: str) -> None:
    """A step that never returns does not keep a stopping worker beyond shutdown_grace."""
    release = threading.Event()

    class Hang(Saga[Item]):
        @step
        def hang(self, item: Item) -> None:
            release.wait(30)

    settings = Settings.defaults().model_copy(update={"shutdown_grace": 0.5})
    with Orchestrator(sagas=[Hang], database=database_url, settings=settings) as orch:
        saga_id = orch.start(Hang, {})
        worker = Worker(orch, poll_interval=0.01)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while orch.status(saga_id).state is not SagaState.RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            begun = time.monotonic()
            worker.stop()
            thread.join(10)
            assert not thread.is_alive()
            assert 0.4 < time.monotonic() - begun < 3
            assert orch.status(saga_id).state is SagaState.RUNNING  # its lease will hand it to another worker
        finally:
            release.set()
            thread.join(10)


def test_step_error_texts_are_made_storable(database_url: str) -> None:
    """An exception message with a NUL character is recorded (escaped), not left to jam the save."""

    class Shout(Saga[Item]):
        @step(retry=1)
        def shout(self, item: Item) -> None:
            raise NonRetryable("bad\x00byte " + "y" * 5000)

    with Orchestrator(sagas=[Shout], database=database_url) as orch:
        saga_id = orch.start(Shout, {})
        (status,) = drain(orch, saga_id)
    assert status.state is SagaState.COMPENSATED
    assert status.error is not None
    assert "\x00" not in status.error
    assert "bad\\x00byte" in status.error
    assert len(status.error) < 2100
