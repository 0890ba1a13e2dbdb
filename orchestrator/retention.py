"""Retention: finished sagas older than a period leave the read models, and (if asked) their
histories are archived to a JSON-lines file and deleted.

``orch.purge(timedelta(days=30), archive="archive/sagas.jsonl")`` does it now (``saga purge``);
the built-in ``Retention`` saga does it on a schedule::

    class NightlyCleanup(Retention):
        schedules = [cron("0 3 * * *", input={"older_than_days": 30, "archive": "archive/sagas.jsonl"})]

Only ``completed``, ``compensated`` and ``cancelled`` sagas go by default: a ``failed`` one waits
for an operator. A saga with a completion notification still to deliver stays. Histories are
deleted only once every follower of the log (projections, triggers, notifications) has read
them, and only after their archive lines are on disk (flushed and fsynced). Without an archive
the histories stay and only the read-model rows go: a rebuild of the status read model brings
them back. A purged saga's id is free again: ``start`` with it starts a new saga.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.definition import Saga, step
from orchestrator.errors import ConfigurationError, InvalidInput
from orchestrator.readmodels.history import history_entries
from orchestrator.states import SagaState
from orchestrator.storage import APPLICATION_NAME

if TYPE_CHECKING:
    from orchestrator.client import Orchestrator

FINISHED = ("completed", "compensated", "cancelled")
"""The states purged by default (``failed`` waits for an operator)."""
log = structlog.get_logger("sagaworks.retention")


class Purged(BaseModel):
    """What a purge did."""

    model_config = ConfigDict(frozen=True)

    sagas: int
    """Sagas removed from the read models."""
    archived: int
    """Of them, how many were archived and had their histories deleted."""
    archive: str | None = None
    before: datetime
    """The cutoff: sagas last updated before it went."""


class RetentionPolicy(BaseModel):
    """The input of the built-in ``Retention`` saga."""

    model_config = ConfigDict(extra="forbid")

    older_than_days: float = Field(30.0, gt=0)
    archive: str | None = None
    """A JSON-lines file the histories are appended to before they are deleted (none: kept)."""
    states: list[str] = Field(default_factory=lambda: list(FINISHED))
    batch: int = Field(500, ge=1, le=10_000)


class Retention(Saga[RetentionPolicy]):
    """Purges old finished sagas: subclass it with ``schedules = [cron(...)]`` to run it nightly."""

    @step
    def purge(self, policy: RetentionPolicy) -> dict[str, Any]:
        orch = self._context.orchestrator
        if orch is None:  # pragma: no cover - the worker always gives it
            raise ConfigurationError("the Retention saga runs in a worker of the orchestrator it purges")
        purged = orch.purge(
            timedelta(days=policy.older_than_days), archive=policy.archive, states=policy.states, batch=policy.batch
        )
        result: dict[str, Any] = purged.model_dump(mode="json")
        return result


def purge(
    orch: Orchestrator,
    older_than: timedelta,
    *,
    archive: str | Path | None = None,
    states: Iterable[str] = FINISHED,
    batch: int = 500,
) -> Purged:
    """Remove finished sagas older than ``older_than`` (see the module's notes); what it did."""
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise InvalidInput(f"older_than is a positive timedelta, not {older_than!r}")
    states = list(states)
    for state in states:
        if state not in {s.value for s in SagaState if s.terminal}:
            raise InvalidInput(f"only finished sagas can be purged; {state!r} is not a finished state")
    path = None if archive is None else Path(archive)
    if path is not None and not path.parent.is_dir():
        raise InvalidInput(f"the archive's directory {str(path.parent)!r} does not exist")
    before = datetime.now(UTC) - older_than
    index = orch.repository.index
    safe = None if path is None else safe_position(orch)
    sagas = archived = 0
    with orch.repository.translating("purging sagas"):
        for state in states:
            while candidates := index.purge_candidates(state, before, safe, batch):
                if path is not None:
                    _archive(orch, path, candidates)
                    archived += len(candidates)
                index.purge(candidates, histories=path is not None)
                sagas += len(candidates)
                if len(candidates) < batch:
                    break
    log.info("purged", sagas=sagas, archived=archived, before=before.isoformat())
    return Purged(sagas=sagas, archived=archived, archive=None if path is None else str(path), before=before)


def safe_position(orch: Orchestrator) -> int:
    """The log position every follower has read up to: histories at or before it may be deleted."""
    positions = {
        name: position
        for name, position in orch.repository.index.tracking_positions().items()
        if name.endswith(f"@{APPLICATION_NAME}")
    }
    from orchestrator.following import tracking_name

    for projection in orch.projections.values():  # a registered projection that never ran has read nothing
        positions.setdefault(tracking_name(projection.name), 0)
    head = orch.store.recorder.max_notification_id() or 0
    return min([head, *positions.values()])


def _archive(orch: Orchestrator, path: Path, saga_uuids: list[UUID]) -> None:
    """Append the sagas' histories to the archive, one JSON line each, on disk before returning."""
    store = orch.repository.store
    histories: dict[UUID, list[Any]] = {}
    for stored in orch.repository.index.select_events_many(saga_uuids):
        histories.setdefault(UUID(str(stored.originator_id)), []).append(store.mapper.to_domain_event(stored))
    lines = []
    for saga_uuid in saga_uuids:
        events = histories.get(saga_uuid, [])
        entries = history_entries(events)
        first = events[0] if events else None
        lines.append(
            orjson.dumps(
                {
                    "saga_id": getattr(first, "saga_id", None),
                    "saga": getattr(first, "saga", None),
                    "saga_uuid": str(saga_uuid),
                    "archived_at": datetime.now(UTC).isoformat(),
                    "events": [entry.model_dump(mode="json") for entry in entries],
                }
            )
        )
    with path.open("ab") as file:
        file.write(b"\n".join(lines) + b"\n")
        file.flush()
        os.fsync(file.fileno())
