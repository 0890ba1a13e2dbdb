"""Group commit: commands that arrive while a transaction is in flight share the next one, and each
caller still gets its own answer (a conflict, a repeat, bad input reach only their caller)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from eventsourcing.persistence import OperationalError

from orchestrator import InvalidInput, Orchestrator, SagaAlreadyStarted, SagaNotFound, SagaState, StorageError
from orchestrator.repository import Repository
from tests.test_smoke import Ship


class Gate:
    """Holds the first transaction open until released, so that the calls behind it queue up."""

    def __init__(self, repository: Repository) -> None:
        self.real = repository._write
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail: BaseException | None = None
        repository.commits.write = self.write  # type: ignore[method-assign]

    def write(self, aggregates: list[Any]) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(10)
        elif self.fail is not None:
            raise self.fail
        self.real(aggregates)


def in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """Run each call in its own thread; what each returned or raised, in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    return threads, results


def queued(orch: Orchestrator, count: int) -> None:
    """Wait until ``count`` calls are queued behind the open transaction."""
    for _ in range(1000):
        if len(orch.repository.commits._queue) >= count:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"only {len(orch.repository.commits._queue)} calls queued")


def test_a_burst_behind_an_open_transaction_goes_in_one_more(database_url: str) -> None:
    """Twenty starts that arrive while one is being written are written together in one transaction."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        gate = Gate(orch.repository)
        first, _ = in_threads([lambda: orch.start(Ship, {"item": "first"}, saga_id="first")])
        assert gate.entered.wait(5)
        threads, results = in_threads(
            [lambda i=i: orch.start(Ship, {"item": f"b{i}"}, saga_id=f"burst-{i}") for i in range(20)]
        )
        queued(orch, 20)
        gate.release.set()
        for thread in [*first, *threads]:
            thread.join()
        assert results == [f"burst-{i}" for i in range(20)]
        assert gate.calls == 2
        assert len(orch.list(limit=100)) == 21


def test_each_caller_of_a_batch_gets_its_own_answer(database_url: str) -> None:
    """In one batch: a start that takes an id already used with other input fails alone; two starts of
    one new id make one saga, the second answered as a repeat; a cancel and a plain start succeed;
    bad input is refused before it queues. Nothing else is affected."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        orch.start(Ship, {"item": "lamp"}, saga_id="taken")
        orch.start(Ship, {"item": "desk"}, saga_id="to-cancel")
        gate = Gate(orch.repository)
        first, _ = in_threads([lambda: orch.start(Ship, {"item": "first"})])
        assert gate.entered.wait(5)
        threads, results = in_threads(
            [
                lambda: orch.start(Ship, {"item": "other"}, saga_id="taken"),
                lambda: orch.start(Ship, {"item": "chair"}, saga_id="twice"),
                lambda: orch.start(Ship, {"item": "chair"}, saga_id="twice"),
                lambda: orch.cancel("to-cancel", "not needed"),
                lambda: orch.start(Ship, {"item": "plain"}, saga_id="plain"),
            ]
        )
        queued(orch, 5)
        with pytest.raises(InvalidInput):
            orch.start(Ship, {"wrong": 1})
        gate.release.set()
        for thread in [*first, *threads]:
            thread.join()
        taken, twice, again, cancelled, plain = results
        assert isinstance(taken, SagaAlreadyStarted)
        assert (twice, again, cancelled, plain) == ("twice", "twice", None, "plain")
        assert [e.type for e in orch.history("twice")] == ["SagaStarted"]
        assert orch.status("taken").state is SagaState.PENDING
        assert orch.history("to-cancel")[-1].type == "CancelRequested"
        assert len(orch.list(limit=100)) == 5


def test_a_failed_commit_loses_only_the_calls_that_had_not_returned(database_url: str) -> None:
    """When the shared transaction cannot be written (the database went away), every call of it gets
    the error and none of its sagas exists; the call that returned before stays durable."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        gate = Gate(orch.repository)
        first, done = in_threads([lambda: orch.start(Ship, {"item": "first"}, saga_id="first")])
        assert gate.entered.wait(5)
        gate.fail = OperationalError("server closed the connection unexpectedly")
        threads, results = in_threads(
            [lambda i=i: orch.start(Ship, {"item": f"l{i}"}, saga_id=f"lost-{i}") for i in range(5)]
        )
        queued(orch, 5)
        gate.release.set()
        for thread in [*first, *threads]:
            thread.join()
        assert done == ["first"]
        assert all(isinstance(result, StorageError) for result in results), results
        assert orch.status("first").state is SagaState.PENDING
        for i in range(5):
            with pytest.raises(SagaNotFound):
                orch.status(f"lost-{i}")


def test_async_starts_share_the_batch_and_get_their_own_answers(database_url: str) -> None:
    """start_async calls queue behind an open transaction beside a thread's start and go in one more
    transaction; a repeat of a taken id with other input fails alone; the event loop is never blocked."""

    async def scenario(orch: Orchestrator, gate: Gate) -> tuple[list[Any], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticking = asyncio.create_task(ticker())
        results = asyncio.gather(
            *(orch.start_async(Ship, {"item": f"a{i}"}, saga_id=f"async-{i}") for i in range(5)),
            orch.start_async(Ship, {"item": "other"}, saga_id="taken"),
            orch.start_async(Ship, {"item": "lamp"}, saga_id="taken"),
            return_exceptions=True,
        )
        await asyncio.to_thread(queued, orch, 8)  # the five, the two on "taken" and the thread's
        before = ticks
        await asyncio.sleep(0.1)
        assert ticks > before  # the loop ran while the calls waited for the transaction
        gate.release.set()
        answers = await results
        ticking.cancel()
        return answers, ticks

    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        orch.start(Ship, {"item": "lamp"}, saga_id="taken")
        gate = Gate(orch.repository)
        first, _ = in_threads([lambda: orch.start(Ship, {"item": "first"}, saga_id="first")])
        assert gate.entered.wait(5)
        thread, thread_result = in_threads([lambda: orch.start(Ship, {"item": "t"}, saga_id="from-a-thread")])
        answers, _ = asyncio.run(scenario(orch, gate))
        for started in [*first, *thread]:
            started.join()
        *fresh, other, repeat = answers
        assert fresh == [f"async-{i}" for i in range(5)]
        assert isinstance(other, SagaAlreadyStarted)
        assert repeat == "taken"
        assert thread_result == ["from-a-thread"]
        assert gate.calls >= 2
        assert len(orch.list(limit=100)) == 8


def test_start_async_refuses_bad_input_before_anything_is_written(database_url: str) -> None:
    """start_async validates as start does: bad input raises InvalidInput at once and writes nothing."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        with pytest.raises(InvalidInput):
            asyncio.run(orch.start_async(Ship, {"wrong": 1}))
        assert orch.list(limit=10) == []
        assert asyncio.run(orch.start_async(Ship, {"item": "ok"}, saga_id="ok")) == "ok"
        assert orch.status("ok").state is SagaState.PENDING


def test_async_commands_reach_the_saga(database_url: str) -> None:
    """cancel_async, like cancel, records the request on the saga."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        orch.start(Ship, {"item": "desk"}, saga_id="desk")
        asyncio.run(orch.cancel_async("desk", "not needed"))
        assert orch.history("desk")[-1].type == "CancelRequested"
        with pytest.raises(SagaNotFound):
            asyncio.run(orch.retry_async("nope"))


def test_an_async_call_whose_loop_has_closed_does_not_strand_the_others(database_url: str) -> None:
    """A start_async whose event loop is gone before its batch commits is still written, and the
    thread callers in the same batch get their answers (the writer thread does not fail on it)."""

    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        gate = Gate(orch.repository)
        first, _ = in_threads([lambda: orch.start(Ship, {"item": "first"}, saga_id="first")])
        assert gate.entered.wait(5)

        async def abandon() -> None:
            task = asyncio.ensure_future(orch.start_async(Ship, {"item": "gone"}, saga_id="abandoned"))
            await asyncio.to_thread(queued, orch, 1)
            task.cancel()

        asyncio.run(abandon())  # the loop closes with the call still queued
        threads, results = in_threads([lambda: orch.start(Ship, {"item": "t"}, saga_id="after")])
        queued(orch, 2)
        gate.release.set()
        for thread in [*first, *threads]:
            thread.join(10)
        assert results == ["after"]
        assert orch.status("abandoned").state is SagaState.PENDING
