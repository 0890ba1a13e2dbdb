"""The status read model: ``SagaStatus``, the document a saga's status row stores, and that row.

Rows are written in the events' own transaction (read-your-writes), by the recorder of each
backend (``storage/``), and rebuilt from the histories by ``projections.status``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from orchestrator.aggregate import SagaAggregate
from orchestrator.machine import SagaRun
from orchestrator.states import SagaState, StepState
from orchestrator.storage.ports import IndexEntry


class StepStatus(BaseModel):
    """One step of a saga as the status shows it, in declaration order."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: StepState
    attempts: int = 0
    last_error: str | None = None
    kind: str = "step"
    compensation_attempts: int = 0


class SagaStatus(BaseModel):
    """A saga's state as the status read model serves it."""

    model_config = ConfigDict(frozen=True)

    saga_id: str
    saga: str
    version: int
    state: SagaState
    current_step: str | None
    steps: list[StepStatus]
    result: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime
    due_at: datetime | None = None
    waiting_for: str | None = None
    queued: str | None = None
    """Why a pending saga waits to be admitted (its limits), until its pool lets it in."""
    problem: str | None = None
    """Why workers have set the saga aside (its history cannot be loaded or saved), if they have."""


def status_document(run: SagaRun) -> bytes:
    """The ``SagaStatus`` of ``run`` as JSON, built with orjson rather than through pydantic: this
    runs on every save of every saga."""
    return orjson.dumps(
        {
            "saga_id": run.saga_id,
            "saga": run.saga,
            "version": run.version,
            "state": run.state.value,
            "current_step": run.current_step(),
            "steps": [
                {
                    "name": node.plan.name,
                    "state": node.state.value,
                    "attempts": node.attempts,
                    "last_error": node.last_error,
                    "kind": node.plan.kind,
                    "compensation_attempts": node.compensation_attempts,
                }
                for node in run.nodes
            ],
            "result": run.results,
            "error": run.error,
            "created_at": run.created_at,
            "updated_at": run.updated_at,
            "due_at": run.due_at,
            "waiting_for": run.waiting_for,
            "queued": run.queued,
        }
    )


def status_of(run: SagaRun) -> SagaStatus:
    """The caller's view of ``run`` (what its status row holds)."""
    return SagaStatus.model_validate_json(status_document(run))


def index_entry(aggregate: SagaAggregate) -> IndexEntry:
    """The index rows (work and status) of an aggregate as it is now."""
    run = aggregate.run
    return IndexEntry(
        saga_uuid=aggregate.id,
        saga_id=run.saga_id,
        saga=run.saga,
        state=run.state.value,
        version=aggregate.version,
        due_at=None if run.queued is not None else run.due_at,
        created_at=run.created_at,
        updated_at=run.updated_at,
        doc=status_document(run),
        search=orjson.dumps(run.search) if run.search else None,
        pool=None if run.pool is None or run.state.terminal or not (run.queued or run.admitted) else run.pool,
        pool_key=run.pool_key,
        queued=run.queued is not None,
        pool_due=run.due_at if run.queued is not None else None,
    )
