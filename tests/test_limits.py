"""Throughput guards: a pool's limit on sagas running at once is never exceeded (counted as the
steps that run at the same time), queued sagas wait in order with the reason in their status and
all run in the end, the start rate holds, and bad limits are refused at definition time."""

from __future__ import annotations

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
    DomainEvent,
    Limits,
    NonRetryable,
    Orchestrator,
    Saga,
    SagaState,
    on,
    step,
    wait_for,
)
from orchestrator.aggregate import aggregate_id
from projections.status import StatusProjection


class Job(BaseModel):
    n: int
    customer: str = "acme"


class Overlap:
    """Counts the steps running at the same time, overall and per customer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    def enter(self, customer: str) -> None:
        with self.lock:
            for key in ("*", customer):
                self.now[key] += 1
                self.most[key] = max(self.most[key], self.now[key])

    def leave(self, customer: str) -> None:
        with self.lock:
            for key in ("*", customer):
                self.now[key] -= 1


OVERLAP = Overlap()


class Throttled(Saga[Job]):
    limits: ClassVar[Any] = Limits(max_running=3)

    @step
    def first(self, job: Job) -> int:
        OVERLAP.enter(job.customer)
        time.sleep(0.02)
        return job.n

    @step
    def second(self, job: Job) -> int:
        time.sleep(0.01)
        OVERLAP.leave(job.customer)
        return job.n


class PerCustomer(Saga[Job]):
    limits: ClassVar[Any] = Limits(max_running=1, per=lambda job: job.customer, max_total=3)

    @step
    def work(self, job: Job) -> int:
        OVERLAP.enter(job.customer)
        time.sleep(0.02)
        OVERLAP.leave(job.customer)
        return job.n


class Held(Saga[Job]):
    """Holds its slot until it is sent ``go``."""

    limits: ClassVar[Any] = Limits(max_running=1)
    go = wait_for("go")

    @step
    def done(self, job: Job) -> int:
        return job.n


class Rated(Saga[Job]):
    limits: ClassVar[Any] = Limits(starts_per_second=20)

    @step
    def work(self, job: Job) -> int:
        return job.n


class Burst(DomainEvent):
    n: int


class Triggered(Saga[Job]):
    triggers: ClassVar[list[Any]] = [on(Burst, input=lambda e: Job(n=e.n), limits=Limits(max_running=1))]
    go = wait_for("go")

    @step
    def done(self, job: Job) -> None: ...


def run_until_done(orch: Orchestrator, saga_ids: list[str], timeout: float = 60) -> None:
    """Run workers in this process (admission included) until every saga has ended."""
    deadline = time.monotonic() + timeout
    while not all(orch.status(saga_id).state.terminal for saga_id in saga_ids):
        assert time.monotonic() < deadline, [orch.status(s).state for s in saga_ids]
        orch.run_worker(wait=False, poll_interval=0.01, concurrency=16)


def test_max_running_is_never_exceeded_and_every_queued_saga_runs(database_url: str) -> None:
    """30 sagas started at once under max_running=3: never more than 3 run at a time (but 3 do),
    and all 30 complete."""
    OVERLAP.__init__()  # type: ignore[misc]
    with Orchestrator(sagas=[Throttled], database=database_url) as orch:
        ids = [orch.start(Throttled, {"n": i}) for i in range(30)]
        assert {orch.status(i).state for i in ids} == {SagaState.PENDING}
        run_until_done(orch, ids)
        assert {orch.status(i).state for i in ids} == {SagaState.COMPLETED}
    assert OVERLAP.most["*"] == 3


def test_a_limit_per_key_and_a_total(database_url: str) -> None:
    """max_running=1 per customer with max_total=3: one per customer at a time, three in all."""
    OVERLAP.__init__()  # type: ignore[misc]
    with Orchestrator(sagas=[PerCustomer], database=database_url) as orch:
        ids = [orch.start(PerCustomer, {"n": i, "customer": f"c{i % 4}"}) for i in range(20)]
        run_until_done(orch, ids)
    assert max(OVERLAP.most[f"c{i}"] for i in range(4)) == 1
    assert OVERLAP.most["*"] <= 3


def test_queued_sagas_wait_in_order_with_the_reason_in_their_status(database_url: str) -> None:
    """While the first saga holds the only slot the others are pending with the reason; when it ends
    the next one started gets the slot; a queued saga can be cancelled without running anything; a
    status rebuild keeps who is queued."""
    with Orchestrator(sagas=[Held], database=database_url) as orch:
        ids = [orch.start(Held, {"n": i}, saga_id=f"held-{i}") for i in range(4)]
        orch.run_worker(wait=False, poll_interval=0.01)
        statuses = [orch.status(i) for i in ids]
        assert statuses[0].waiting_for == "go"
        assert statuses[0].queued is None
        assert [s.state for s in statuses[1:]] == [SagaState.PENDING] * 3
        assert {s.queued for s in statuses[1:]} == {"waiting for a slot: at most 1 running"}
        orch.cancel("held-2", "not needed")
        StatusProjection(orch).rebuild()
        assert orch.repository.index.pool_running("Held") == {"": 1}
        assert [u for u, _ in orch.repository.index.pool_waiting("Held", 10, datetime.now(UTC), [])] == [
            aggregate_id("held-1"),
            aggregate_id("held-3"),
        ]
        orch.send("held-0", "go")
        orch.run_worker(wait=False, poll_interval=0.01)
        assert orch.status("held-0").state is SagaState.COMPLETED
        assert orch.status("held-1").waiting_for == "go"
        assert orch.status("held-2").state is SagaState.CANCELLED
        assert orch.status("held-2").steps[-1].attempts == 0
        assert orch.status("held-3").queued is not None
        types = [e.type for e in orch.history("held-1")]
        assert types[:2] == ["SagaStarted", "SagaAdmitted"]


def test_the_start_rate_holds(database_url: str) -> None:
    """starts_per_second=20 with 40 sagas queued: a burst of at most 20, then no faster than 20/s, so
    the last is admitted no sooner than a second after the first."""
    with Orchestrator(sagas=[Rated], database=database_url) as orch:
        ids = [orch.start(Rated, {"n": i}) for i in range(40)]
        run_until_done(orch, ids)
        admitted = sorted(e.timestamp for saga_id in ids for e in orch.history(saga_id) if e.type == "SagaAdmitted")
    assert len(admitted) == 40
    since = [(t - admitted[0]).total_seconds() for t in admitted]
    # A bucket of 20 refilled at 20/s: the k-th admission comes no sooner than (k - 20) / 20 s in.
    assert all(seconds >= (k - 20) / 20 - 0.01 for k, seconds in enumerate(since))
    assert since[-1] >= 0.9


def test_a_trigger_sets_limits_for_the_sagas_it_starts(database_url: str) -> None:
    """Sagas started by a trigger with limits queue in the trigger's pool; the same saga started by
    hand is not limited."""
    with Orchestrator(sagas=[Triggered], database=database_url) as orch:
        for i in range(3):
            orch.emit(Burst(n=i))
        orch.log.drain(orch.trigger_processor)
        by_hand = orch.start(Triggered, {"n": 9})
        orch.run_worker(wait=False, poll_interval=0.01)
        triggered = [s for s in orch.list(saga="Triggered") if s.saga_id != by_hand]
        assert sorted(s.queued is None for s in triggered) == [False, False, True]
        assert orch.status(by_hand).waiting_for == "go"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Limits(max_running=0), "at least 1"),
        (lambda: Limits(), "needs max_running, starts_per_second or both"),
        (lambda: Limits(per=lambda j: j.customer), "needs max_running"),
        (lambda: Limits(max_running=2, max_total=3), "without per="),
        (lambda: Limits(starts_per_second=float("nan")), "positive number"),
        (lambda: Limits(max_running=2, per="customer"), "function of the saga's input"),
    ],
)
def test_bad_limits_are_refused_at_definition(make: Any, message: str) -> None:
    """Each bad Limits raises DefinitionError saying what is wrong."""
    with pytest.raises(DefinitionError, match=message):
        make()


def test_limits_must_be_a_limits() -> None:
    """A saga class whose limits is not a Limits is refused when the class is made."""
    with pytest.raises(DefinitionError, match="is a Limits"):

        class Bad(Saga[Job]):
            limits: ClassVar[Any] = {"max_running": 3}

            @step
            def work(self, job: Job) -> None: ...


def _two_workers_share_a_pool(durable_url: str, log: Path) -> tuple[int, set[str]]:
    """Two ``saga worker`` processes run 16 ``Logged`` sagas (a pool of 2); the most steps that ever
    ran at once, and the processes that ran steps."""
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "SAGA_POLL_INTERVAL": "0.05",
        "LIMITS_LOG": str(log),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    from tests.limits_app import Logged

    command = [sys.executable, "-m", "orchestrator", "--log-level", "warning", "worker", "--app"]
    workers = [
        subprocess.Popen([*command, "tests.limits_app:app"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    try:
        # Both processes up before the sagas arrive: on a loaded machine one may start a second
        # after the other, time enough for the first to run all 16 alone.
        deadline = time.monotonic() + 60
        while not log.exists() or log.read_text().count("ready") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # each opens its storage and starts listening
        with Orchestrator(sagas=[Logged], database=durable_url) as orch:
            ids = [orch.start(Logged, {"n": i}) for i in range(16)]
            deadline = time.monotonic() + 60
            while not all(orch.status(i).state.terminal for i in ids):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert {orch.status(i).state for i in ids} == {SagaState.COMPLETED}
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        errors = [worker.communicate(timeout=30)[1].decode() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), errors
    moments = []
    for line in log.read_text().splitlines():
        kind, at, pid = line.split()
        if kind != "ready":
            moments.append((float(at), 1 if kind == "start" else -1, pid))
    running = most = 0
    for _, change, _ in sorted(moments, key=lambda m: (m[0], m[1])):  # an end before a start at the same time
        running += change
        most = max(most, running)
    return most, {pid for *_, pid in moments}


@pytest.mark.slow
def test_two_worker_processes_never_run_more_than_the_limit(durable_url: str, tmp_path: Path) -> None:
    """Two ``saga worker`` processes share a pool of 2: the steps' start and end times, written by both
    processes, never overlap more than twice, and all 16 sagas complete."""
    # Which process claims which saga is up to the race between them; the limit must hold in every
    # round, and in at least one both processes must have run steps (else it proved nothing).
    rounds = []
    for k in range(3):
        rounds.append(_two_workers_share_a_pool(durable_url, tmp_path / f"steps-{k}.log"))
        if len(rounds[-1][1]) == 2:
            break
    assert all(most <= 2 for most, _ in rounds)
    assert len(rounds[-1][1]) == 2  # both processes ran steps


class PerKeyHeld(Saga[Job]):
    limits: ClassVar[Any] = Limits(max_running=1, per=lambda job: job.customer)
    go = wait_for("go")

    @step
    def done(self, job: Job) -> None: ...


class Undoable(Saga[Job]):
    """Fails its second step for good; its compensation fails too while FAILING says so."""

    limits: ClassVar[Any] = Limits(max_running=1)

    @step
    def book(self, job: Job) -> None: ...

    @book.compensate
    def unbook(self, job: Job, result: None) -> None:
        if FAILING["on"]:
            raise NonRetryable("refund service down")

    @step
    def charge(self, job: Job) -> None:
        if job.n == 1:
            raise NonRetryable("card declined")

    go = wait_for("go")


FAILING = {"on": True}


def test_a_full_key_or_later_starts_hide_no_other_saga(database_url: str) -> None:
    """600 queued sagas of a full key, or 600 whose start_at lies ahead, do not keep a saga of another
    key (or one due now) from its slot."""
    with Orchestrator(sagas=[PerKeyHeld, Held], database=database_url) as orch:
        for i in range(600):
            orch.start(PerKeyHeld, {"n": i, "customer": "big"})
        small = orch.start(PerKeyHeld, {"n": 0, "customer": "small"})
        tomorrow = datetime.now(UTC) + timedelta(days=1)
        for i in range(600):
            orch.start(Held, {"n": i}, start_at=tomorrow)
        now = orch.start(Held, {"n": 999})
        orch.admission.run()
        orch.admission.run()
        assert orch.status(small).queued is None
        assert orch.status(now).queued is None
        assert orch.repository.index.pool_running("PerKeyHeld") == {"big": 1, "small": 1}


def test_a_retried_failed_saga_waits_for_a_slot_again(database_url: str) -> None:
    """A failed saga gave its slot up; retried while another holds the only slot, it queues instead of
    running past the limit, and runs its undo once the slot frees."""
    FAILING["on"] = True
    with Orchestrator(sagas=[Undoable], database=database_url) as orch:
        failed = orch.start(Undoable, {"n": 1})
        run_until_done(orch, [failed])
        assert orch.status(failed).state is SagaState.FAILED
        holder = orch.start(Undoable, {"n": 2})
        orch.run_worker(wait=False, poll_interval=0.01)
        assert orch.status(holder).waiting_for == "go"
        FAILING["on"] = False
        orch.retry(failed)
        orch.run_worker(wait=False, poll_interval=0.01)
        assert orch.status(failed).queued is not None
        assert orch.repository.index.pool_running("Undoable") == {"": 1}
        orch.cancel(holder, compensate=False)
        run_until_done(orch, [failed])
        assert orch.status(failed).state is SagaState.COMPENSATED


def test_the_queue_of_a_pool_no_longer_defined_is_let_in(durable_url: str) -> None:
    """Sagas queued under limits that a later release removed are admitted, not stranded."""
    with Orchestrator(sagas=[Held], database=durable_url) as orch:
        ids = [orch.start(Held, {"n": i}) for i in range(3)]

    class Unlimited(Saga[Job]):
        name = "Held"
        go = wait_for("go")

        @step
        def done(self, job: Job) -> int:
            return job.n

    with Orchestrator(sagas=[Unlimited], database=durable_url) as orch:
        orch.admission.run()
        assert [orch.status(i).queued for i in ids] == [None, None, None]


def test_two_admission_passes_racing_never_admit_past_the_limit(durable_url: str) -> None:
    """Two orchestrators' admission passes released at the same moment, fifteen times, one of them
    planning from a stale count: its save is refused whole, so never more than max_running hold slots."""
    a = Orchestrator(sagas=[Held], database=durable_url).open()
    b = Orchestrator(sagas=[Held], database=durable_url).open()
    # b counts the pool's slots, then dawdles while a admits and commits, then reads the queue: it
    # plans from a count that is out of date by the time it saves. Only the in-transaction check
    # can stop it.
    index: Any = b.repository.index
    read = index.pool_running

    def slow_read(pool: str) -> dict[str, int]:
        found: dict[str, int] = read(pool)
        time.sleep(0.05)
        return found

    index.pool_running = slow_read
    try:
        for i in range(40):
            a.start(Held, {"n": i})
        for _ in range(15):
            barrier = threading.Barrier(2)

            def admit(orch: Orchestrator, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                orch.admission.admit("Held", Held.limits)

            threads = [threading.Thread(target=admit, args=(orch,)) for orch in (a, b)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sum(a.repository.index.pool_running("Held").values()) <= 1
            for status in a.list(saga="Held", limit=100):
                if status.queued is None and not status.state.terminal:
                    a.cancel(status.saga_id, compensate=False)
    finally:
        a.close()
        b.close()
