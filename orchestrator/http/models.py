"""What the HTTP API's bodies look like (the OpenAPI document's schemas), and the URLs it hands out."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import InvalidInput
from orchestrator.readmodels.status import SagaStatus


class Started(BaseModel):
    """The answer to a start: the saga's id and where to poll it, send it events, cancel and retry it."""

    saga_id: str
    saga: str
    status_url: str
    events_url: str
    """A template: put the event's name in place of ``{event}``."""
    cancel_url: str
    retry_url: str
    history_url: str
    timeline_url: str


class SagaList(BaseModel):
    """A page of sagas and, if there are more, the cursor and URL of the next page."""

    items: list[SagaStatus]
    next_cursor: str | None = None
    next: str | None = None


class Counts(BaseModel):
    """How many sagas there are, by saga name and state."""

    counts: dict[str, dict[str, int]]
    total: int


class CancelRequest(BaseModel):
    """What a cancel asks for."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)
    compensate: bool = True
    """``false`` ends the saga where it stands, running nothing more (the way out of ``failed``)."""


def saga_url(saga_id: str, *rest: str) -> str:
    """The URL path of a saga (the id percent-encoded), or of one of its resources."""
    return "/".join([f"/sagas/{quote(saga_id, safe='')}", *rest])


def started(saga: str, saga_id: str) -> Started:
    url = saga_url(saga_id)
    return Started(
        saga_id=saga_id,
        saga=saga,
        status_url=url,
        events_url=f"{url}/events/{{event}}",
        cancel_url=f"{url}/cancel",
        retry_url=f"{url}/retry",
        history_url=f"{url}/history",
        timeline_url=f"{url}/timeline",
    )


def parse_search(items: list[str]) -> dict[str, Any]:
    """``field:value`` pairs; a value that reads as a JSON number or boolean is one, else it is text."""
    search: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition(":")
        if not sep:
            raise InvalidInput(f"search takes field:value, not {item[:60]!r}")
        try:
            value = orjson.loads(raw)
            search[name] = value if isinstance(value, bool | int | float) else raw
        except orjson.JSONDecodeError:
            search[name] = raw
    return search


class ScheduleRun(BaseModel):
    """One tick of a schedule: the saga it started, or why it started none."""

    tick: datetime
    saga_id: str | None = None
    skipped: str | None = None


class ScheduleInfo(BaseModel):
    """A schedule as its read model keeps it (what ``saga schedules list --json`` prints)."""

    schedule_id: str
    saga: str
    spec: dict[str, Any] = Field(description="cron, every or at; tz, input, policies (defaults left out)")
    paused: bool
    reason: str | None = Field(description="Why it was paused")
    declared: bool = Field(description="Declared in code next to the saga (not created at run time)")
    next_fire_at: datetime | None = Field(description="The next tick; none while paused or after the last")
    buffered: datetime | None = Field(description="A tick held back until the previous run ends (overlap 'buffer')")
    last_tick: datetime | None
    last_saga_id: str | None = Field(description="The saga the last tick started")
    runs: list[ScheduleRun] = Field(description="The last ten ticks dealt with, oldest first")
    version: int


class Emitted(BaseModel):
    """The answer to an emitted domain event: its id (a repeat of the same ``Idempotency-Key`` records nothing)."""

    event_id: str
    name: str
