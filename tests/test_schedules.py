"""Schedules driven by a controllable clock: the right ticks fire exactly once (across DST changes,
with schedulers racing), each catch-up and overlap policy does what it says, schedules are
event-sourced and managed at run time, and bad definitions are refused before anything is written."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from orchestrator import (
    DefinitionError,
    InvalidInput,
    InvalidTransition,
    Orchestrator,
    Saga,
    SagaState,
    ScheduleNotFound,
    cron,
    every,
    once,
    step,
    wait_for,
)
from orchestrator.aggregate import aggregate_id
from orchestrator.schedules import Scheduler
from orchestrator.schedules import aggregate as sa
from orchestrator.schedules.service import UNDECLARED
from tests.conftest import drain


class Tick(BaseModel):
    report: str = "nightly"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def at(text: str) -> datetime:
    """An aware UTC moment from ``2026-03-28T01:30``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def clocked(orch: Orchestrator, clock: Clock) -> Orchestrator:
    orch.scheduler.clock = clock
    return orch


def walk(orch: Orchestrator, clock: Clock, until: datetime, step: timedelta = timedelta(minutes=5)) -> None:
    """Move the clock in steps up to ``until``, letting the scheduler look at every step."""
    while clock.now < until:
        clock.advance(seconds=step.total_seconds())
        orch.scheduler.run()


def started(orch: Orchestrator, schedule_id: str) -> list[str]:
    """The ticks (UTC, from the saga ids) a schedule started sagas for, in order."""
    prefix = f"schedule:{schedule_id}:"
    return sorted(s.saga_id.removeprefix(prefix) for s in orch.list(limit=10_000) if s.saga_id.startswith(prefix))


def input_of(orch: Orchestrator, saga_id: str) -> dict[str, Any]:
    """The input a saga was started with."""
    return orch.repository.load(aggregate_id(saga_id)).run.input


def history(orch: Orchestrator, schedule_id: str) -> list[Any]:
    """A schedule's events, oldest first."""
    uuid = sa.schedule_uuid(schedule_id)
    return list(orch.store.events.get(uuid))


class Nightly(Saga[Tick]):
    schedules: ClassVar[list[Any]] = [cron("30 2 * * *", tz="Europe/Berlin", overlap="allow", name="nightly")]

    @step
    def build(self, tick: Tick) -> str:
        return tick.report


class Report(Saga[Tick]):
    """Scheduled at run time only."""

    @step
    def build(self, tick: Tick) -> str:
        return tick.report


class Approval(Saga[Tick]):
    """Stays running until it is sent ``approved``: the previous run that ticks overlap with."""

    approved = wait_for("approved")

    @step
    def done(self, tick: Tick) -> None: ...


def test_a_cron_schedule_fires_each_tick_once_across_both_dst_changes(database_url: str) -> None:
    """02:30 Berlin time fires once on the day clocks go forward (at 03:00, as croniter documents) and at
    both 02:30s on the day they go back; looking again at the same moment starts nothing more."""
    clock = Clock(at("2026-03-27T12:00"))
    with clocked(Orchestrator(sagas=[Nightly], database=database_url), clock) as orch:
        walk(orch, clock, at("2026-03-30T12:00"))
        assert started(orch, "nightly") == [
            "2026-03-28T01:30:00+00:00",
            "2026-03-29T01:00:00+00:00",  # 02:30 did not exist: 03:00 CEST
            "2026-03-30T00:30:00+00:00",
        ]
        orch.scheduler.run()
        clock.now = at("2026-10-24T00:25")
        orch.scheduler.run()  # long downtime, catch-up "skip": the missed ticks are skipped, once, visibly
        walk(orch, clock, at("2026-10-26T12:00"))
        assert started(orch, "nightly")[3:] == [
            "2026-10-24T00:30:00+00:00",
            "2026-10-25T00:30:00+00:00",  # 02:30 CEST
            "2026-10-25T01:30:00+00:00",  # 02:30 CET, an hour later
            "2026-10-26T01:30:00+00:00",
        ]
        kinds = Counter(type(event).__name__ for event in history(orch, "nightly"))
        assert kinds == {"ScheduleCreated": 1, "ScheduleFired": 7, "ScheduleSkipped": 1}
        assert "missed" in orch.scheduler.rows()[0]["runs"][3]["skipped"]


def test_two_schedulers_racing_on_one_clock_start_each_tick_once(durable_url: str) -> None:
    """Two orchestrators on one database look at the same ticks at the same moments: every tick starts
    one saga and is recorded once in the schedule's history (the loser's save is refused, not doubled)."""
    clock = Clock(at("2026-05-01T00:00"))
    a = clocked(Orchestrator(sagas=[Nightly], database=durable_url), clock).open()
    b = clocked(Orchestrator(sagas=[Nightly], database=durable_url), clock).open()
    try:
        a.scheduler.run()
        b.scheduler.run()
        a.schedule(Nightly, every=600, schedule_id="ten-minutes", overlap="allow")
        for _ in range(24):
            clock.advance(minutes=10)
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def look(
                orch: Orchestrator, barrier: threading.Barrier = barrier, errors: list[BaseException] = errors
            ) -> None:
                barrier.wait()
                try:
                    orch.scheduler.run()
                except BaseException as error:
                    errors.append(error)

            threads = [threading.Thread(target=look, args=(orch,)) for orch in (a, b)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors
        ticks = started(a, "ten-minutes")
        assert len(ticks) == 24 == len(set(ticks))
        fired = [e.tick for e in history(a, "ten-minutes") if isinstance(e, sa.ScheduleFired)]
        assert len(fired) == 24 == len(set(fired))
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("skip", []),
        ("latest", ["2026-05-01T04:00:00+00:00"]),
        ("all", ["2026-05-01T02:00:00+00:00", "2026-05-01T03:00:00+00:00", "2026-05-01T04:00:00+00:00"]),
    ],
)
def test_each_catch_up_policy_after_downtime(database_url: str, policy: str, expected: list[str]) -> None:
    """Four hours without a scheduler, then a look 20 minutes after the last tick: skip fires none of
    the missed ticks, latest fires the last one, all fires those inside its 3-hour window."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Report], database=database_url), clock) as orch:
        window = 3 * 3600 + 60
        orch.schedule(
            Report, every=3600, schedule_id="hourly", catch_up=policy, catch_up_window=window, overlap="allow"
        )
        clock.now = at("2026-05-01T04:20")
        orch.scheduler.run()
        orch.scheduler.run()
        assert started(orch, "hourly") == expected
        clock.now = at("2026-05-01T05:00:30")  # on time again: every policy fires it
        orch.scheduler.run()
        assert started(orch, "hourly")[-1] == "2026-05-01T05:00:00+00:00"


def test_overlap_skip_buffer_and_allow(database_url: str) -> None:
    """While the previous run still waits for approval: skip records the tick as skipped, buffer holds
    one tick (the latest) and fires it once the previous run ends, allow fires every tick."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Approval], database=database_url), clock) as orch:
        for policy in ("skip", "buffer", "allow"):
            orch.schedule(Approval, every=600, schedule_id=policy, overlap=policy)
        for _ in range(3):
            clock.advance(minutes=10, seconds=1)
            orch.scheduler.run()
        assert len(started(orch, "skip")) == 1
        assert len(started(orch, "buffer")) == 1
        assert len(started(orch, "allow")) == 3
        rows = {row["schedule_id"]: row for row in orch.scheduler.rows()}
        assert [run.get("skipped") for run in rows["skip"]["runs"]] == [
            None,
            "the previous run was still going",
            "the previous run was still going",
        ]
        assert rows["buffer"]["buffered"] is not None
        first = "schedule:buffer:" + started(orch, "buffer")[0]
        orch.send(first, "approved")
        orch.run_worker(wait=False)
        assert orch.status(first).state is SagaState.COMPLETED
        orch.scheduler.run()
        assert started(orch, "buffer") == ["2026-05-01T00:10:00+00:00", "2026-05-01T00:30:00+00:00"]
        assert orch.scheduler.rows()[0]["buffered"] is None


def test_pause_resume_edit_trigger_backfill_and_delete_are_in_the_history(database_url: str) -> None:
    """A paused schedule fires nothing (its reason shown); resume, an edit, a manual trigger and a
    backfill (which skips ticks already run) are events of its history; a deleted one stays deleted."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Report], database=database_url), clock) as orch:
        orch.schedule(Report, every=3600, schedule_id="hourly", input={"report": "hourly"})
        orch.scheduler.pause("hourly", "quarter close")
        row = orch.scheduler.rows()[0]
        assert (row["paused"], row["reason"], row["next_fire_at"]) == (True, "quarter close", None)
        walk(orch, clock, at("2026-05-01T03:00"))
        assert started(orch, "hourly") == []
        orch.scheduler.resume("hourly")
        walk(orch, clock, at("2026-05-01T04:00"), timedelta(minutes=1))
        assert started(orch, "hourly") == ["2026-05-01T04:00:00+00:00"]
        orch.schedule(Report, every=1800, schedule_id="hourly", input={"report": "half-hourly"})
        manual = orch.scheduler.trigger("hourly")
        assert input_of(orch, manual) == {"report": "half-hourly"}
        backfilled = orch.scheduler.backfill("hourly", at("2026-05-01T03:00"), at("2026-05-01T04:30"))
        assert backfilled == [
            "schedule:hourly:2026-05-01T03:00:00+00:00",
            "schedule:hourly:2026-05-01T03:30:00+00:00",
            "schedule:hourly:2026-05-01T04:00:00+00:00",  # ran already: not started again
        ]
        assert input_of(orch, backfilled[2]) == {"report": "hourly"}
        orch.scheduler.delete("hourly")
        assert orch.scheduler.rows() == []
        with pytest.raises(InvalidTransition, match="deleted"):
            orch.scheduler.resume("hourly")
        with pytest.raises(InvalidTransition, match="deleted"):
            orch.schedule(Report, every=60, schedule_id="hourly")
        with pytest.raises(ScheduleNotFound):
            orch.scheduler.pause("nope")
        walk(orch, clock, at("2026-05-01T06:00"))
        assert len(started(orch, "hourly")) == 4
        kinds = [type(event).__name__ for event in history(orch, "hourly")]
        assert kinds == [
            "ScheduleCreated",
            "SchedulePaused",
            "ScheduleResumed",
            "ScheduleSkipped",  # 03:00, missed while paused (catch-up "skip")
            "ScheduleFired",
            "ScheduleEdited",
            "ScheduleFired",
            "ScheduleFired",
            "ScheduleFired",
            "ScheduleFired",
            "ScheduleDeleted",
        ]


def test_start_end_once_and_jitter(database_url: str) -> None:
    """No ticks outside start..end; a one-off schedule fires once; jitter delays a tick's saga by the
    same amount in every worker (it comes from the schedule and the tick) and never past the limit."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Report], database=database_url), clock) as orch:
        orch.schedule(
            Report,
            every(600, start=at("2026-05-01T01:00"), end=at("2026-05-01T01:30"), overlap="allow"),
            schedule_id="window",
        )
        orch.schedule(Report, once(at("2026-05-01T00:45")), schedule_id="once")
        orch.schedule(Report, every=600, schedule_id="jittered", jitter=120, overlap="allow")
        walk(orch, clock, at("2026-05-01T03:00"), timedelta(minutes=1))
        assert started(orch, "window") == [f"2026-05-01T01:{m}:00+00:00" for m in ("00", "10", "20", "30")]
        assert started(orch, "once") == ["2026-05-01T00:45:00+00:00"]
        assert orch.scheduler.rows()[1]["next_fire_at"] is None
        spec = orch.scheduler.load("jittered").spec
        delays = [spec.delay("jittered", at("2026-05-01T00:10") + timedelta(minutes=10 * i)) for i in range(18)]
        assert all(timedelta(0) <= d < timedelta(seconds=120) for d in delays)
        assert len(set(delays)) > 1
        assert delays[0] == spec.delay("jittered", at("2026-05-01T00:10"))
        first = orch.repository.load(aggregate_id("schedule:jittered:2026-05-01T00:10:00+00:00"))
        assert first.run.due_at == at("2026-05-01T00:10") + delays[0]


def test_declared_schedules_follow_the_code(durable_url: str) -> None:
    """A declared schedule is created once by whichever worker looks first, edited when the code
    changes it, paused when the code drops it, and resumed when it comes back."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Nightly], database=durable_url), clock) as orch:
        orch.scheduler.run()
        assert [row["schedule_id"] for row in orch.scheduler.rows()] == ["nightly"]

    class Changed(Saga[Tick]):
        name = "Nightly"
        schedules: ClassVar[list[Any]] = [cron("0 3 * * *", tz="Europe/Berlin", name="nightly")]

        @step
        def build(self, tick: Tick) -> None: ...

    class Dropped(Saga[Tick]):
        name = "Nightly"

        @step
        def build(self, tick: Tick) -> None: ...

    for saga, cron_expression, paused in [(Changed, "0 3 * * *", False), (Dropped, "0 3 * * *", True)]:
        with clocked(Orchestrator(sagas=[saga], database=durable_url), clock) as orch:
            orch.scheduler.run()
            row = orch.scheduler.rows()[0]
            assert (row["spec"]["cron"], row["paused"]) == (cron_expression, paused)
    assert row["reason"] == UNDECLARED
    with clocked(Orchestrator(sagas=[Nightly], database=durable_url), clock) as orch:
        orch.scheduler.run()
        row = orch.scheduler.rows()[0]
        assert (row["spec"]["cron"], row["paused"]) == ("30 2 * * *", False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: cron("61 * * * *"), "not a cron expression"),
        (lambda: cron("0 2 * * *", tz="Europe/Atlantis"), "unknown time zone 'Europe/Atlantis'"),
        (lambda: every(0), "every: Input should be greater than 0"),
        (lambda: once(datetime(2026, 5, 1)), "timezone-aware"),
        (lambda: every(60, overlap="sometimes"), "overlap"),
        (lambda: every(60, start=at("2026-05-02T00:00"), end=at("2026-05-01T00:00")), "end must come after start"),
    ],
)
def test_bad_schedules_are_refused_at_definition(make: Any, message: str) -> None:
    """A bad cron expression, an unknown time zone or a bad policy raises DefinitionError naming it."""
    with pytest.raises(DefinitionError, match=message):
        make()


def test_a_schedule_whose_input_does_not_fit_the_saga_is_refused_at_definition() -> None:
    """A declared schedule's input is checked against the saga's input model when the class is made."""
    with pytest.raises(DefinitionError, match="report: Input should be a valid string"):

        class Broken(Saga[Tick]):
            schedules: ClassVar[list[Any]] = [every(60, input={"report": 7})]

            @step
            def build(self, tick: Tick) -> None: ...


def test_bad_run_time_schedules_write_nothing(database_url: str) -> None:
    """orch.schedule with a bad cron, time zone, input or saga raises InvalidInput (or UnknownSaga) and
    creates no schedule."""
    with Orchestrator(sagas=[Report], database=database_url) as orch:
        with pytest.raises(InvalidInput, match="not a cron expression"):
            orch.schedule(Report, cron="0 25 * * *", schedule_id="bad")
        with pytest.raises(InvalidInput, match="unknown time zone"):
            orch.schedule(Report, cron="0 2 * * *", tz="Nowhere/City", schedule_id="bad")
        with pytest.raises(InvalidInput, match="report"):
            orch.schedule(Report, every=60, input={"report": ["x"]}, schedule_id="bad")
        with pytest.raises(InvalidInput, match="spec or keywords"):
            orch.schedule(Report, every(60), every=60, schedule_id="bad")
        with pytest.raises(ScheduleNotFound):
            orch.scheduler.load("bad")
        assert orch.scheduler.rows() == []


@pytest.mark.slow
def test_two_worker_processes_racing_fire_every_tick_once_through_the_dst_night(durable_url: str) -> None:
    """Two ``saga worker`` processes on one fast clock (24 schedule minutes per second) through the night
    Berlin clocks go back: every 10-minute tick from the schedule's creation on starts exactly one saga
    (no gap at the repeated hour, no double), each recorded once, and every started saga completes."""
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "SAGA_POLL_INTERVAL": "0.05",
        "SCHEDULE_CLOCK": "2026-10-24T23:50:00+00:00 1440",
        "SCHEDULE_REAL_ORIGIN": str(time.time()),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    command = [sys.executable, "-m", "orchestrator", "--log-level", "warning", "worker", "--app"]
    workers = [
        subprocess.Popen(
            [*command, "tests.schedule_app:app"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        time.sleep(7)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        errors = [worker.communicate(timeout=30)[1].decode() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), errors
    assert not any("failed" in text for text in errors), errors
    from tests.schedule_app import Report as Scheduled

    with Orchestrator(sagas=[Scheduled], database=durable_url) as orch:
        ticks = [datetime.fromisoformat(t) for t in started(orch, "report")]
        assert len(ticks) >= 8
        assert all(later - earlier == timedelta(minutes=10) for earlier, later in itertools.pairwise(ticks))
        assert ticks[0] < at("2026-10-25T01:00") < ticks[-1]  # 02:00-03:00 ran twice: both hours fired
        created = orch.scheduler.load("report").created
        assert ticks[0] - created <= timedelta(minutes=10)
        fired = [e.tick for e in history(orch, "report") if isinstance(e, sa.ScheduleFired)]
        assert len(fired) == len(ticks) == len(set(fired))
        drain(orch, *[Scheduler.saga_id("report", tick) for tick in ticks])


def test_a_far_off_tick_still_fires_and_a_broken_schedule_stops_no_other(database_url: str) -> None:
    """A one-off schedule 500 days ahead shows its fire time and fires then; a schedule whose saga the
    code no longer has is logged and skipped while the others fire; too long an id is refused."""
    clock = Clock(at("2026-05-01T00:00"))
    with clocked(Orchestrator(sagas=[Report, Nightly], database=database_url), clock) as orch:
        far = at("2026-05-01T00:00") + timedelta(days=500)
        orch.schedule(Report, once(far), schedule_id="far")
        assert orch.scheduler.rows()[0]["next_fire_at"] == far.isoformat()
        orch.schedule(Nightly, every=60, schedule_id="a-gone", overlap="allow")
        orch.schedule(Report, every=60, schedule_id="b-kept", overlap="allow")
        with pytest.raises(InvalidInput, match="at most 150"):
            orch.schedule(Report, every=60, schedule_id="x" * 151)
    clock.advance(seconds=61)
    with clocked(Orchestrator(sagas=[Report], database=database_url), clock) as orch:
        if orch.database.durable:
            orch.scheduler.run()
            assert started(orch, "b-kept") == ["2026-05-01T00:01:00+00:00"]
            assert "UnknownSaga" in orch.scheduler.problems["a-gone"]
            clock.now = far + timedelta(seconds=1)
            orch.scheduler.run()
            assert started(orch, "far") == [far.isoformat()]


def test_schedules_without_an_id_differ_by_definition(database_url: str) -> None:
    """Two run-time schedules of one saga with different inputs get different ids; the same one twice
    is one schedule."""
    with Orchestrator(sagas=[Report], database=database_url) as orch:
        a = orch.schedule(Report, every=60, input={"report": "a"})
        b = orch.schedule(Report, every=60, input={"report": "b"})
        assert a != b
        assert orch.schedule(Report, every=60, input={"report": "a"}) == a
        assert len(orch.scheduler.rows()) == 2
