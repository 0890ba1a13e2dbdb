"""What ``history()`` returns: a saga's events as plain entries, in order."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from orchestrator.events import SagaEvent

_INTERNAL = {"originator_id", "originator_version", "timestamp", "originator_topic"}


class HistoryEvent(BaseModel):
    """One event of a saga's history, as ``history()`` returns it."""

    model_config = ConfigDict(frozen=True)

    type: str
    version: int
    timestamp: datetime
    step: str | None = None
    data: dict[str, Any]


def history_entries(events: Iterable[SagaEvent]) -> list[HistoryEvent]:
    """The entries of a saga's events, in order."""
    return [
        HistoryEvent(
            type=type(event).__name__,
            version=event.originator_version,
            timestamp=event.timestamp,
            step=event.step,
            data=event.model_dump(mode="json", exclude=_INTERNAL),
        )
        for event in events
    ]
