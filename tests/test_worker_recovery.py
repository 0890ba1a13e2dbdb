"""The worker's recovery paths: lost acknowledgements, failures while stopping, sagas set aside mid-attempt,
and the rule that tells storage trouble (back off) from one saga's bad data (confine it)."""

from __future__ import annotations

import enum
import threading
import time
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from eventsourcing.persistence import DataError, IntegrityError, InternalError, OperationalError, ProgrammingError
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from orchestrator import InvalidInput, Orchestrator, RetryPolicy, Saga, SagaState, Settings, step, wait_for
from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.storage import is_transient
from orchestrator.worker import Worker
from tests.conftest import drain
from tests.poison_app import Pick
from tests.test_worker import Once


class Empty(BaseModel):
    pass


@pytest.mark.parametrize("error", [IntegrityError("duplicate key"), OperationalError("connection closed")])
@pytest.mark.parametrize("which", [2, 3])
def test_an_outcome_save_that_landed_but_reported_an_error_runs_the_next_step(
    database_url: str, monkeypatch: pytest.MonkeyPatch, error: Exception, which: int
) -> None:
    """When the save of an outcome (with the next step's claim) lands but reports a conflict or a dropped
    connection, the worker adopts the claim it made: no attempt is lost or run twice."""
    Once.runs = []
    settings = Settings.defaults().model_copy(update={"lease_seconds": 2.0})
    with Orchestrator(sagas=[Once], database=database_url, settings=settings) as orch:
        saga_id = orch.start(Once, {"n": 1})
        original, saves = orch.repository.save, [0]

        def save(aggregates: list[Any], **options: Any) -> None:
            original(aggregates, **options)
            saves[0] += 1
            if saves[0] == which:
                raise error

        monkeypatch.setattr(orch.repository, "save", save)
        (status,) = drain(orch, saga_id)
        history = orch.history(saga_id)
    assert status.state is SagaState.COMPLETED
    assert [e for e in history if e.type == "StepAttemptFailed"] == []
    assert Once.runs == [("charge", 1), ("ship", 1)]


def test_a_failed_round_while_stopping_is_retried_within_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """One transient error after stop() does not drop an outcome in hand while grace time is left."""
    settings = Settings.defaults().model_copy(update={"shutdown_grace": 30.0})
    gate = threading.Event()

    class Held(Saga[Empty]):
        @step
        def held(self, data: Empty) -> str:
            gate.wait(10)
            return "done"

    with Orchestrator(sagas=[Held], database="memory://", settings=settings) as orch:
        saga_id = orch.start(Held, {})
        worker = Worker(orch, poll_interval=0.01)
        real, failed = orch.store.save_sagas, [0]

        def save_sagas(aggregates: list[Any], index: list[Any]) -> None:
            if worker.stopping.is_set() and not failed[0]:
                failed[0] = 1
                raise OperationalError("canceling statement due to lock timeout")
            real(aggregates, index)

        monkeypatch.setattr(orch.store, "save_sagas", save_sagas)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        while orch.status(saga_id).state is not SagaState.RUNNING:
            time.sleep(0.01)
        worker.stop()
        gate.set()
        thread.join(10)
        assert not thread.is_alive()
        assert failed[0] == 1
        assert "StepSucceeded" in [e.type for e in orch.history(saga_id)]


class Slow(Saga[Empty]):
    live: ClassVar[int] = 0
    peak: ClassVar[int] = 0
    attempts: ClassVar[list[int]] = []
    lock = threading.Lock()

    @step(retry=RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.01))
    def slow(self, data: Empty) -> str:
        with Slow.lock:
            Slow.attempts.append(self.attempt)
            Slow.live += 1
            Slow.peak = max(Slow.peak, Slow.live)
        time.sleep(2.5 if self.attempt == 1 else 0.05)
        with Slow.lock:
            Slow.live -= 1
        return "done"

    go = wait_for("go")


def test_a_saga_set_aside_while_its_attempt_runs_gets_no_second_attempt_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Set aside from the renewal path mid-attempt, a saga is not claimed and run again while the first
    attempt's thread still runs."""
    import orchestrator.storage.memory

    monkeypatch.setattr(orchestrator.storage.memory, "set_aside_delay", lambda failures: timedelta(seconds=0.2))
    Slow.attempts, Slow.peak, Slow.live = [], 0, 0
    settings = Settings.defaults().model_copy(update={"lease_seconds": 0.6})
    with Orchestrator(sagas=[Slow], database="memory://", settings=settings) as orch:
        saga_id = orch.start(Slow, {})
        uuid = aggregate_id(saga_id)
        worker = Worker(orch, poll_interval=0.02)
        real = orch.repository.fold_each
        trap = {"armed": False, "sprung": False}

        def fold_each(records: Any) -> Any:
            records = list(records)
            loaded, broken = real(records)
            if trap["armed"] and not trap["sprung"] and uuid in loaded:
                trap["sprung"] = True
                del loaded[uuid]
                broken[uuid] = (records[-1].originator_version, "its history cannot be loaded: simulated")
            return loaded, broken

        monkeypatch.setattr(orch.repository, "fold_each", fold_each)
        thread = threading.Thread(target=worker.run, kwargs={"drain": False})
        thread.start()
        try:
            while not Slow.attempts:
                time.sleep(0.01)
            orch.send(saga_id, "go")  # the next renewal conflicts; its reload is the one that breaks
            trap["armed"] = True
            time.sleep(3)
        finally:
            worker.stop()
            thread.join(15)
    assert trap["sprung"]
    assert Slow.peak == 1, "two attempts of one step ran at once"


def test_a_saga_is_set_aside_once_per_round(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saga whose decision raises is set aside once, even when the batch is then redone saga by saga."""
    with Orchestrator(sagas=[Pick], database=database_url) as orch:
        orch.start(Pick, {"name": "bad"}, saga_id="bad")
        orch.start(Pick, {"name": "refused"}, saga_id="refused")
        advance = SagaAggregate.advance

        def failing_advance(self: SagaAggregate, *args: Any, **kwargs: Any) -> Any:
            if self.run.saga_id == "bad":
                raise RuntimeError("decision failed")
            return advance(self, *args, **kwargs)

        monkeypatch.setattr(SagaAggregate, "advance", failing_advance)
        real, refused = orch.store.save_sagas, [0]

        def save_sagas(aggregates: list[Any], index: list[Any]) -> None:
            if any(a.run.saga_id == "refused" for a in aggregates) and not refused[0]:
                refused[0] = 1
                raise DataError("value refused")
            real(aggregates, index)

        monkeypatch.setattr(orch.store, "save_sagas", save_sagas)
        with capture_logs() as logs:
            orch.run_worker(wait=False, poll_interval=0.01)
        asides = [line for line in logs if line["event"] == "saga set aside"]
        assert len(asides) == 1
        assert "decision failed" in (orch.status("bad").problem or "")


def _caused_by(error: Exception, sqlstate: str) -> Exception:
    class Driver(Exception):
        pass

    cause = Driver("driver error")
    cause.sqlstate = sqlstate  # type: ignore[attr-defined]
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OperationalError("server closed the connection"), True),
        (_caused_by(InternalError("cannot execute INSERT in a read-only transaction"), "25006"), True),
        (_caused_by(ProgrammingError("relation does not exist"), "42P01"), True),
        (DataError("invalid byte sequence"), False),
        (IntegrityError("duplicate key"), False),
        (_caused_by(InternalError("numeric field overflow"), "22003"), False),
        (ValueError("not a database error"), False),
    ],
)
def test_storage_trouble_is_told_from_bad_data(error: Exception, transient: bool) -> None:
    """Read-only, missing tables and lost connections are the database's condition (back off, every saga
    alike); refused values and constraints belong to the saga that wrote them."""
    assert is_transient(error) is transient


class Colour(enum.Enum):
    BAD = "r\x00ed"


class Tint(BaseModel):
    model_config = ConfigDict(extra="allow")

    colour: Colour | None = None


def test_serialisers_cannot_smuggle_a_nul_into_storage(database_url: str) -> None:
    """NULs made by serialisers (enum values, extra keys) are refused at start and fail an output for good,
    alike on every backend."""

    class Paint(Saga[Tint]):
        @step(retry=3)
        def mix(self, tint: Tint) -> Colour:
            return Colour.BAD

        @step
        def dry(self, tint: Tint) -> None: ...

    with Orchestrator(sagas=[Paint], database=database_url) as orch:
        with pytest.raises(InvalidInput, match="NUL"):
            orch.start(Paint, Tint(colour=Colour.BAD))
        with pytest.raises(InvalidInput, match="NUL"):
            orch.start(Paint, {"k\x00": 1})  # an extra field's name
        saga_id = orch.start(Paint, {})
        (status,) = drain(orch, saga_id)
    assert status.state is SagaState.COMPENSATED
    assert "cannot be stored" in (status.error or "")
    assert status.steps[0].attempts == 1
