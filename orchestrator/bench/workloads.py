"""The sagas that ``saga bench`` runs, and the orchestrator its worker subprocesses load.

Worker processes run ``saga worker --app orchestrator.bench.workloads:worker_app``: the same
orchestrator as ``app()``, with logging narrowed so that the worker's closing "worker
stopped" line (its transaction counters and peak RSS) reaches the bench even at
``--log-level warning``, while the per-attempt lines cost next to nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel

from orchestrator import DomainEvent, NonRetryable, Orchestrator, Saga, SagaState, on, step, wait_for

GO = "go"
"""The event the ``wait`` workload's sagas wait for; the bench sends it."""
REPORTED = frozenset({"worker started", "worker stopped"})
"""Info lines a bench worker always logs: the bench waits for the first and reads the second."""


class BenchInput(BaseModel):
    """Input of every bench saga: a number, so that inputs differ a little, as real ones do."""

    n: int = 0


class BenchOk(Saga[BenchInput]):
    """Three no-op steps: the engine's own cost per step."""

    @step
    def one(self, job: BenchInput) -> None:
        return None

    @step
    def two(self, job: BenchInput) -> None:
        return None

    @step
    def three(self, job: BenchInput) -> None:
        return None


class BenchCompensate(Saga[BenchInput]):
    """Three steps; the third fails for good, so the compensations of the first two run."""

    @step
    def one(self, job: BenchInput) -> None:
        return None

    @one.compensate
    def undo_one(self, job: BenchInput, result: None) -> None:
        return None

    @step
    def two(self, job: BenchInput) -> None:
        return None

    @two.compensate
    def undo_two(self, job: BenchInput, result: None) -> None:
        return None

    @step
    def three(self, job: BenchInput) -> None:
        raise NonRetryable("the bench's third step always fails")


class BenchWait(Saga[BenchInput]):
    """A step, a durable wait for ``go`` (sent by the bench), a step."""

    @step
    def before(self, job: BenchInput) -> None:
        return None

    go = wait_for(GO)

    @step
    def after(self, job: BenchInput) -> None:
        return None


class BenchEvent(DomainEvent):
    """The domain event of the ``events`` workload: each starts one ``BenchTriggered``."""

    n: int


class BenchTriggered(Saga[BenchInput]):
    """One no-op step, started directly or by a ``BenchEvent`` through a trigger."""

    triggers: ClassVar[list[Any]] = [on(BenchEvent, input=lambda event: BenchInput(n=event.n))]

    @step
    def one(self, job: BenchInput) -> None:
        return None


@dataclass(frozen=True)
class Workload:
    """A saga the bench runs, with what it should end as and what it costs in attempts."""

    name: str
    saga: type[Saga[Any]]
    attempts: int
    """Attempts (steps and compensations) one saga runs: ``steps_per_s`` is ``sagas_per_s`` times this."""
    final: SagaState
    """The terminal state every saga of the workload must reach."""
    sends: bool = False
    """Whether the bench must ``send(GO)`` to each saga once it waits."""


WORKLOADS: dict[str, Workload] = {
    "ok": Workload("ok", BenchOk, 3, SagaState.COMPLETED),
    "compensate": Workload("compensate", BenchCompensate, 5, SagaState.COMPENSATED),
    "wait": Workload("wait", BenchWait, 2, SagaState.COMPLETED, sends=True),
}
"""The workloads that run sagas through workers (``status`` measures reads and has its own code)."""

BENCH_SAGAS: list[type[Saga[Any]]] = [BenchOk, BenchCompensate, BenchWait, BenchTriggered]
"""Every saga a bench worker must know."""


def app(database: str | None = None) -> Orchestrator:
    """An orchestrator for the bench sagas; the database defaults to ``SAGA_DATABASE_URL``."""
    return Orchestrator(sagas=BENCH_SAGAS, database=database)


def worker_app() -> Orchestrator:
    """``app()`` for a bench worker process: also lets its "worker started/stopped" lines through.

    The CLI has configured logging by the time it calls this; the worker logs those lines at
    info level, so lower the threshold to info and drop, first thing, every other line below
    warning (before it is rendered).
    """
    structlog.configure(
        processors=[_keep_reported, *structlog.get_config()["processors"]],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    return app()


def _keep_reported(logger: Any, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    if method in ("debug", "info") and event.get("event") not in REPORTED:
        raise structlog.DropEvent
    return event
