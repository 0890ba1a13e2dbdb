"""Sagas for the crash and scale tests, run by ``saga worker --app tests.crash_app:app`` subprocesses.

Side effects are appended to the file named by ``CRASH_LOG`` (one line per effect, with
the worker's pid), so the parent test can count them after killing workers.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from orchestrator import Orchestrator, RetryPolicy, Saga, step

FAST = RetryPolicy(max_attempts=5, initial_interval=0.05, max_interval=0.2)


class Job(BaseModel):
    """Input of the test sagas; ``hold`` is how long the slow step's first attempt blocks."""

    n: int = 0
    hold: float = 0.0


def effect(line: str) -> None:
    """Record a side effect, durably enough for the parent to read after a SIGKILL."""
    with open(os.environ["CRASH_LOG"], "a") as log:
        log.write(f"{line} pid={os.getpid()}\n")
        log.flush()
        os.fsync(log.fileno())


class SlowMiddle(Saga[Job]):
    """Three steps; the middle one blocks on its first attempt, long enough to be killed."""

    @step(retry=FAST)
    def first(self, job: Job) -> int:
        effect(f"first {self.saga_id} attempt={self.attempt}")
        return 1

    @step(retry=FAST)
    def slow(self, job: Job) -> int:
        effect(f"slow-start {self.saga_id} attempt={self.attempt}")
        if self.attempt == 1:
            time.sleep(job.hold)
        effect(f"slow-done {self.saga_id} attempt={self.attempt}")
        return 2

    @step(retry=FAST)
    def last(self, job: Job) -> int:
        effect(f"last {self.saga_id} attempt={self.attempt}")
        return 3


class ThreeSteps(Saga[Job]):
    """Three quick steps, for the many-workers test."""

    @step(retry=FAST)
    def one(self, job: Job) -> int:
        effect(f"one {self.saga_id}")
        return job.n

    @step(retry=FAST)
    def two(self, job: Job) -> int:
        effect(f"two {self.saga_id}")
        return job.n + 1

    @step(retry=FAST)
    def three(self, job: Job) -> int:
        effect(f"three {self.saga_id}")
        return job.n + 2


def app() -> Orchestrator:
    """The orchestrator the worker subprocesses load (database from SAGA_DATABASE_URL)."""
    return Orchestrator(sagas=[SlowMiddle, ThreeSteps])
