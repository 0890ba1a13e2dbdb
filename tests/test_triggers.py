"""Domain events and the sagas they start: each matching event starts exactly one saga (twice-recorded
events and a crash mid-batch included), conditions skip visibly, a saga's end starts the next one."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from orchestrator import (
    DefinitionError,
    DomainEvent,
    InvalidInput,
    Orchestrator,
    Saga,
    SagaState,
    UnknownEvent,
    on,
    step,
)
from orchestrator.triggers import TriggerProcessor


class ClaimSubmitted(DomainEvent):
    claim_id: str
    employee: str
    amount: float


class Claim(BaseModel):
    id: str
    employee: str
    amount: float


class ExpenseApproval(Saga[Claim]):
    triggers: ClassVar[list[Any]] = [
        on(
            ClaimSubmitted,
            when=lambda e: e.amount > 500,
            input=lambda e: Claim(id=e.claim_id, employee=e.employee, amount=e.amount),
        )
    ]

    @step
    def review(self, claim: Claim) -> str:
        if not claim.id.endswith("-follow-up"):
            follow_up = ClaimSubmitted(claim_id=f"{claim.id}-follow-up", employee=claim.employee, amount=claim.amount)
            self.emit(follow_up)
        return "reviewed"


class Receipt(BaseModel):
    saga: str
    saga_id: str


class Archive(Saga[Receipt]):
    """Started by every ExpenseApproval that completes (chaining through SagaEnded)."""

    from orchestrator import SagaEnded as _Ended

    triggers: ClassVar[list[Any]] = [
        on(
            _Ended,
            when=lambda e: e.saga == "ExpenseApproval" and e.state == "completed",
            input=lambda e: {"saga": e.saga, "saga_id": e.saga_id},
        )
    ]

    @step
    def file(self, receipt: Receipt) -> None: ...


def run_all(orch: Orchestrator, rounds: int = 20) -> None:
    """Run workers (which run the trigger processor) until nothing is left to do."""
    for _ in range(rounds):
        orch.run_worker(wait=False, poll_interval=0.01)
        if not orch.log.lag(orch.trigger_processor).events and all(s.state.terminal for s in orch.list()):
            orch.run_worker(wait=False, poll_interval=0.01)
            if not orch.log.lag(orch.trigger_processor).events:
                return


def test_an_event_starts_exactly_one_saga_and_a_false_condition_starts_none(database_url: str) -> None:
    """A matching event starts one saga (its id from the event), a repeat of the event id records and
    starts nothing more, and an event whose condition is false is listed as skipped."""
    with Orchestrator(sagas=[ExpenseApproval], database=database_url) as orch:
        big = orch.emit(ClaimSubmitted(claim_id="c1", employee="ada", amount=900), event_id="ev-1")
        assert orch.emit(ClaimSubmitted(claim_id="c1", employee="ada", amount=900), event_id="ev-1") == big
        with pytest.raises(InvalidInput, match="already used"):
            orch.emit(ClaimSubmitted(claim_id="c9", employee="ada", amount=1), event_id="ev-1")
        orch.emit("ClaimSubmitted", {"claim_id": "c2", "employee": "bob", "amount": 20}, event_id="ev-2")
        orch.log.drain(orch.trigger_processor)
        started = orch.list(saga="ExpenseApproval")
        assert [s.saga_id for s in started] == ["ExpenseApproval.on.ClaimSubmitted:ev-1"]
        listed = {e.event_id: e for e in orch.events()}
        assert listed["ev-1"].triggers == [
            {"trigger": "ExpenseApproval.on.ClaimSubmitted", "started": started[0].saga_id}
        ]
        assert listed["ev-2"].triggers == [
            {"trigger": "ExpenseApproval.on.ClaimSubmitted", "skipped": "condition is false"}
        ]
        orch.trigger_processor.reset(orch.repository.index)  # processing the whole log again starts nothing new
        orch.log.drain(orch.trigger_processor)
        assert len(orch.list(saga="ExpenseApproval")) == 1


def test_a_crash_mid_batch_starts_nothing_and_the_retry_starts_each_saga_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If recording a batch fails, no saga of it was started; the next run starts each one once."""
    with Orchestrator(sagas=[ExpenseApproval], database=database_url) as orch:
        for i in range(5):
            orch.emit(ClaimSubmitted(claim_id=f"c{i}", employee="ada", amount=600 + i), event_id=f"e{i}")
        real = TriggerProcessor._write
        calls = [0]

        def crash_once(self: TriggerProcessor, *args: Any) -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("the worker died while recording")
            real(self, *args)

        monkeypatch.setattr(TriggerProcessor, "_write", crash_once)
        with pytest.raises(RuntimeError):
            orch.log.catch_up(orch.trigger_processor)
        assert orch.list() == []
        orch.log.drain(orch.trigger_processor)
        assert sorted(s.saga_id for s in orch.list()) == [f"ExpenseApproval.on.ClaimSubmitted:e{i}" for i in range(5)]


def test_racing_processors_start_each_saga_once(durable_url: str) -> None:
    """Two processors following the log at once (two workers) start each triggered saga exactly once."""
    with Orchestrator(sagas=[ExpenseApproval], database=durable_url) as orch:
        for i in range(30):
            orch.emit(ClaimSubmitted(claim_id=f"c{i}", employee="ada", amount=501 + i), event_id=f"r{i}")
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            with Orchestrator(sagas=[ExpenseApproval], database=durable_url) as mine:
                for _ in range(40):
                    mine.log.catch_up(mine.trigger_processor, limit=4)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=follow) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with Orchestrator(sagas=[ExpenseApproval], database=durable_url) as orch:
        orch.log.drain(orch.trigger_processor)
        assert len(orch.list()) == 30


def test_a_step_emits_and_a_saga_end_chains_the_next_saga(database_url: str) -> None:
    """A step's emitted event triggers a saga too, and a completed saga's end starts the Archive saga."""
    with Orchestrator(sagas=[ExpenseApproval, Archive], database=database_url) as orch:
        orch.emit(ClaimSubmitted(claim_id="c1", employee="ada", amount=700), event_id="chain")
        run_all(orch)
        approvals = sorted(s.saga_id for s in orch.list(saga="ExpenseApproval"))
        archives = orch.list(saga="Archive")
        first = "ExpenseApproval.on.ClaimSubmitted:chain"
        assert first in approvals
        assert len(approvals) == 2  # the follow-up claim the first one's step emitted started another
        assert len(archives) == 2  # each completed approval was archived, once
        assert all(s.state is SagaState.COMPLETED for s in archives)
        emitted = [e for e in orch.events() if e.source is not None]
        assert [e.source for e in emitted] == [first]


def test_bad_triggers_and_events_are_refused() -> None:
    """A trigger on something that is not a DomainEvent class, or with a condition that is not
    callable, fails at class creation; an unknown event name fails at emit."""
    with pytest.raises(DefinitionError, match="DomainEvent class"):
        on(dict)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="callable"):
        on(ClaimSubmitted, when=True)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="list of on"):

        class Bad(Saga[Claim]):
            triggers: ClassVar[list[Any]] = ["ClaimSubmitted"]

            @step
            def one(self, claim: Claim) -> None: ...

    with Orchestrator(sagas=[ExpenseApproval], database="memory://") as orch:
        with pytest.raises(UnknownEvent, match="ClaimSubmitted"):
            orch.emit("Nope", {})
        with pytest.raises(InvalidInput, match="amount"):
            orch.emit("ClaimSubmitted", {"claim_id": "x", "employee": "y"})
        with pytest.raises(InvalidInput, match="not a finite"):
            orch.emit(ClaimSubmitted(claim_id="x", employee="y", amount=float("nan")))


def test_events_over_http_and_the_cli(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /events/{name} records an event (202, idempotent by key) that triggers its saga; unknown
    names are 404, bad bodies 422; `saga emit` and `saga events` do the same from the command line."""
    import warnings

    from click.testing import CliRunner

    from orchestrator.cli import cli
    from orchestrator.http.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    url = f"sqlite:///{tmp_path / 'events.db'}"
    with Orchestrator(sagas=[ExpenseApproval], database=url) as orch, TestClient(create_app(orch)) as client:
        body = {"claim_id": "h1", "employee": "ada", "amount": 800}
        sent = client.post("/events/ClaimSubmitted", json=body, headers={"Idempotency-Key": "http-1"})
        assert (sent.status_code, sent.json()) == (202, {"event_id": "http-1", "name": "ClaimSubmitted"})
        assert (
            client.post("/events/ClaimSubmitted", json=body, headers={"Idempotency-Key": "http-1"}).status_code == 202
        )
        assert client.post("/events/Nope", json={}).json()["type"] == "/problems/unknown-event"
        assert client.post("/events/ClaimSubmitted", json={"claim_id": 1}).status_code == 422
        orch.log.drain(orch.trigger_processor)
        assert [s.saga_id for s in orch.list()] == ["ExpenseApproval.on.ClaimSubmitted:http-1"]
        assert [e["event_id"] for e in client.get("/events").json()] == ["http-1"]
    source = "from orchestrator import Orchestrator\nfrom tests.test_triggers import ExpenseApproval\n"
    (tmp_path / "trig.py").write_text(source + "app = Orchestrator(sagas=[ExpenseApproval])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAGA_DATABASE_URL", url)
    runner = CliRunner()
    emitted = runner.invoke(
        cli,
        [
            "emit",
            "ClaimSubmitted",
            "--data",
            '{"claim_id": "k", "employee": "bo", "amount": 1}',
            "--id",
            "cli-1",
            "--app",
            "trig:app",
        ],
    )
    assert (emitted.exit_code, emitted.output.strip()) == (0, "cli-1")
    listed = runner.invoke(cli, ["events", "--app", "trig:app"])
    assert [line for line in listed.output.splitlines() if "cli-1" in line]


def test_long_event_ids_that_share_a_prefix_start_two_sagas(database_url: str) -> None:
    """Event ids of 200 characters differing only at the end give two saga ids (a hash keeps them apart)."""
    with Orchestrator(sagas=[ExpenseApproval], database=database_url) as orch:
        for i in (1, 2):
            orch.emit(ClaimSubmitted(claim_id=f"c{i}", employee="ada", amount=900), event_id="e" * 190 + f"/claim-{i}")
        orch.log.drain(orch.trigger_processor)
        started = [s.saga_id for s in orch.list(saga="ExpenseApproval")]
        assert len(set(started)) == 2
        assert all(len(saga_id) <= 200 for saga_id in started)


def test_sagas_ends_are_read_only_while_a_trigger_starts_a_saga_on_one() -> None:
    """Without a trigger on SagaEnded the processor follows domain events alone (every saga's end
    would otherwise be read, with its history, for nothing); with one it follows the ends too."""
    alone = Orchestrator(sagas=[ExpenseApproval], database="memory://").trigger_processor
    chained = Orchestrator(sagas=[ExpenseApproval, Archive], database="memory://").trigger_processor
    assert alone.events == ["DomainEventRecorded", "DomainEventEmitted"]
    assert {"SagaCompleted", "SagaCompensated", "SagaCancelled", "SagaFailed"} <= set(chained.events)
