"""The step timeline: every attempt of every step and compensation (and every wait) of a saga, with
its start, end, duration, worker and error, folded from the saga's history."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from orchestrator import events as ev

Kind = Literal["step", "compensation", "wait", "notification"]
Outcome = Literal[
    "running", "succeeded", "failed", "retrying", "lost", "received", "timed out", "resolved", "abandoned"
]


class TimelineEntry(BaseModel):
    """One attempt (or one wait, or one notification delivery) of a saga."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    name: str
    attempt: int
    started_at: datetime
    ended_at: datetime | None = None
    duration_ms: float | None = None
    worker: str | None = None
    outcome: Outcome = "running"
    error: str | None = None
    retry_at: datetime | None = None


def _close(entry: TimelineEntry, at: datetime, outcome: Outcome, **extra: object) -> TimelineEntry:
    duration = round((at - entry.started_at).total_seconds() * 1000, 3)
    return entry.model_copy(update={"ended_at": at, "duration_ms": duration, "outcome": outcome, **extra})


def timeline_of(events: Iterable[ev.SagaEvent]) -> list[TimelineEntry]:
    """The timeline of one saga's events, in the order the attempts started."""
    entries: list[TimelineEntry] = []
    open_at: dict[tuple[str, str], int] = {}  # (kind, name) -> index of its attempt still running

    def end(kind: str, name: str, at: datetime, outcome: Outcome, **extra: object) -> None:
        index = open_at.pop((kind, name), None)
        if index is not None:
            entries[index] = _close(entries[index], at, outcome, **extra)

    for event in events:
        at = event.timestamp
        if isinstance(event, ev.StepStarted | ev.CompensationStarted):
            kind = "step" if isinstance(event, ev.StepStarted) else "compensation"
            open_at[(kind, event.name)] = len(entries)
            entries.append(
                TimelineEntry(kind=kind, name=event.name, attempt=event.attempt, started_at=at, worker=event.worker)
            )
        elif isinstance(event, ev.StepSucceeded | ev.CompensationSucceeded):
            end("step" if isinstance(event, ev.StepSucceeded) else "compensation", event.name, at, "succeeded")
        elif isinstance(event, ev.AttemptFailed):
            kind = "step" if isinstance(event, ev.StepAttemptFailed | ev.StepFailed) else "compensation"
            lost = "lease expired" in event.error
            retrying = isinstance(event, ev.Retrying)
            outcome: Outcome = "lost" if lost else "retrying" if retrying else "failed"
            extra = {"retry_at": event.retry_at} if isinstance(event, ev.Retrying) else {}
            end(kind, event.name, at, outcome, error=event.error, **extra)
        elif isinstance(event, ev.CompensationResolved):
            entries.append(
                _close(
                    TimelineEntry(kind="compensation", name=event.name, attempt=0, started_at=at),
                    at,
                    "resolved",
                    error=event.reason,
                )
            )
        elif isinstance(event, ev.WaitStarted):
            open_at[("wait", event.event)] = len(entries)
            entries.append(TimelineEntry(kind="wait", name=event.event, attempt=1, started_at=at))
        elif isinstance(event, ev.EventReceived):
            end("wait", event.event, at, "received")
        elif isinstance(event, ev.WaitTimedOut):
            end("wait", event.event, at, "timed out", error=f"no {event.event!r} in time")
        elif isinstance(event, ev.CancelRequested | ev.SagaTerminated):
            for kind, name in list(open_at):
                if kind == "wait" or isinstance(event, ev.SagaTerminated):
                    end(kind, name, at, "abandoned")
    return entries
