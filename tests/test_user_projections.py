"""Projections users write: each event applied exactly once (across crashes and racing runners),
rebuilt to the same rows, lag back to zero, and a runner process that wakes on new events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from orchestrator import InvalidInput, Orchestrator, Saga, step
from orchestrator.following import tracking_name
from projections import Change, Projection, Rows
from tests.conftest import drain

ROOT = Path(__file__).resolve().parent.parent


class Spend(BaseModel):
    who: str
    amount: int


class Purchase(Saga[Spend]):
    @step
    def buy(self, spend: Spend) -> None: ...


class Totals(Projection):
    """Total and count of completed purchases per person."""

    name = "totals"
    events: ClassVar[list[str]] = ["SagaCompleted"]
    sagas: ClassVar[list[str]] = ["Purchase"]
    fail_on: ClassVar[set[str]] = set()

    def apply(self, change: Change, rows: Rows) -> None:
        if change.saga_id in self.fail_on:
            self.fail_on.discard(change.saga_id)
            raise RuntimeError("crash in the middle of a batch")
        rows.add(change.input["who"], "total", change.input["amount"])
        rows.add(change.input["who"], "count", 1)


class EveryEvent(Projection):
    """Counts every event of the log, whatever its type."""

    name = "every_event"

    def apply(self, change: Change, rows: Rows) -> None:
        rows.add(change.type, "n", 1)


def buy(orch: Orchestrator, n: int, prefix: str = "p") -> list[str]:
    ids = [
        orch.start(Purchase, {"who": ["ada", "bob"][i % 2], "amount": i + 1}, saga_id=f"{prefix}{i}") for i in range(n)
    ]
    drain(orch, *ids)
    return ids


def expected(n: int) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for i in range(n):
        row = totals.setdefault(["ada", "bob"][i % 2], {"total": 0, "count": 0})
        row["total"] += i + 1
        row["count"] += 1
    return totals


def test_each_event_is_applied_once(database_url: str) -> None:
    """Running the projections twice over the same log gives the same rows as running them once."""
    with Orchestrator(sagas=[Purchase], database=database_url, projections=[Totals(), EveryEvent()]) as orch:
        buy(orch, 6)
        assert orch.projection_lag()["totals"]["lag_events"] > 0
        orch.run_projections()
        assert orch.projection("totals") == expected(6)
        orch.run_projections()
        assert orch.projection("totals") == expected(6)
        assert orch.projection("every_event")["SagaCompleted"] == {"n": 6}
        assert orch.projection("totals", "ada") == expected(6)["ada"]
        assert orch.projection("totals", "nobody") is None
        lag = orch.projection_lag()
        assert lag["totals"] == lag["every_event"] == {"lag_events": 0.0, "lag_seconds": 0.0}
        with pytest.raises(InvalidInput, match="no projection named"):
            orch.projection("nope")


def test_a_crash_mid_batch_or_between_batches_repeats_nothing(durable_url: str) -> None:
    """A batch that fails half-way leaves rows and position as they were; a new process resumes at the
    tracked position, and in the end every event counted exactly once."""
    with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as orch:
        buy(orch, 8)
        projection = orch.projections["totals"]
        assert orch.log.catch_up(projection, limit=3)  # a batch recorded: then the process "dies"
        after_first = orch.projection("totals")
        Totals.fail_on = {f"p{i}" for i in range(8)}  # whichever comes next fails
        try:
            with pytest.raises(RuntimeError):
                orch.log.catch_up(projection, limit=100)
        finally:
            Totals.fail_on = set()
        assert orch.projection("totals") == after_first  # the failed batch wrote nothing
    with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as again:
        again.run_projections()
        assert again.projection("totals") == expected(8)


def test_rebuild_gives_the_same_rows(database_url: str) -> None:
    """A rebuild drops the rows and the position and replays the log into the same rows."""
    with Orchestrator(sagas=[Purchase], database=database_url, projections=[Totals()]) as orch:
        buy(orch, 5)
        orch.run_projections()
        before = orch.projection("totals")
        orch.repository.index.write_rows("totals", {"ada": b'{"total": -1}'}, _tracking(orch, "totals"))
        assert orch.projection("totals") != before
        orch.rebuild_projection("totals")
        assert orch.projection("totals") == before == expected(5)


def _tracking(orch: Orchestrator, name: str) -> Any:
    from eventsourcing.persistence import Tracking

    position = orch.repository.index.tracked(tracking_name(name)) or 0
    return Tracking(tracking_name(name), position + 1)


def test_two_runners_racing_still_count_each_event_once(durable_url: str) -> None:
    """Two processes following the same log at once: one of them records each batch, never both."""
    with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as orch:
        buy(orch, 12)
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as mine:
                for _ in range(20):
                    mine.log.catch_up(mine.projections["totals"], limit=2)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=follow) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as orch:
        orch.run_projections()
        assert orch.projection("totals") == expected(12)


RUNNER_APP = """
from orchestrator import Orchestrator
from tests.test_user_projections import Purchase, Totals
app = Orchestrator(sagas=[Purchase], projections=[Totals()])
"""


@pytest.mark.slow
def test_the_runner_process_wakes_on_new_events(durable_url: str, tmp_path: Path) -> None:
    """`saga projections run` with a 30 s poll picks up a new saga's end within seconds (it is woken,
    not polling), reports what it does, and stops on SIGTERM."""
    (tmp_path / "runner_app.py").write_text(RUNNER_APP)
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": durable_url,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--json-logs",
            "projections",
            "run",
            "--poll-interval",
            "30",
            "--app",
            "runner_app:app",
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        with Orchestrator(sagas=[Purchase], database=durable_url, projections=[Totals()]) as orch:
            time.sleep(1.5)  # the runner is up and idle, waiting 30 s for its next poll
            buy(orch, 2)
            deadline = time.monotonic() + 10
            while orch.projection("totals") != expected(2):
                assert time.monotonic() < deadline, orch.projection("totals")
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr.decode()
    assert b"projection runner started" in stderr
    assert b"projection batch recorded" in stderr
    assert b"projection runner stopped" in stderr
