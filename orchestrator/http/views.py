"""What the dashboard's pages show, apart from the routes: the list's filters in the query string,
the timeline's bars, schedules' rows, and the small formatters the templates use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request

from orchestrator.errors import InvalidInput
from orchestrator.http.models import parse_search
from orchestrator.readmodels.status import SagaStatus
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.schedules import describe
from orchestrator.states import SagaState

FILTERS = ("state", "saga", "search", "created_after", "created_before", "updated_after", "updated_before", "limit")
TIMES = ("created_after", "created_before", "updated_after", "updated_before")
DEFAULT_LIMIT = 25
MAX_LIMIT = 200
STATES = [state.value for state in SagaState]
ACTIVE = (SagaState.PENDING, SagaState.RUNNING, SagaState.WAITING, SagaState.COMPENSATING)
STEERABLE = (SagaState.PENDING, SagaState.RUNNING, SagaState.WAITING)
"""States in which a saga can be cancelled and sent events."""
FAST_POLL, SLOW_POLL = "2s", "10s"
"""How often the list refreshes while some saga is unfinished, and when none is."""
RECENT_RUNS = 3
"""Ticks the schedules page shows per schedule, newest first."""


@dataclass
class Listing:
    """The list's filters as the query string gives them (text, as typed), and any they got wrong."""

    state: str = ""
    saga: str = ""
    search: list[str] = field(default_factory=list)
    times: dict[str, str] = field(default_factory=dict)
    limit: str = ""
    cursor: str = ""
    noisy: bool = False
    """The query string had empty or unknown parameters (a submitted form): redirect to the clean one."""

    @classmethod
    def parse(cls, request: Request) -> Listing:
        listing = cls()
        for key, raw in request.query_params.multi_items():
            value = raw.strip()
            if not value or (key not in FILTERS and key != "cursor"):
                listing.noisy = True
            elif key == "search":
                listing.search.append(value)
            elif key in TIMES:
                listing.times[key] = value
            else:
                setattr(listing, key, value)
        return listing

    def params(self, cursor: str | None = None) -> list[tuple[str, str]]:
        """The query parameters of these filters (and of a page's cursor), in a stable order."""
        items = [("state", self.state), ("saga", self.saga)]
        items += [("search", s) for s in self.search]
        items += [(name, self.times.get(name, "")) for name in TIMES]
        items += [("limit", self.limit), ("cursor", cursor or "")]
        return [(k, v) for k, v in items if v]

    def query(self, cursor: str | None = None) -> str:
        return urlencode(self.params(cursor))

    @property
    def filtered(self) -> bool:
        return bool(self.state or self.saga or self.search or self.times)

    def page_size(self) -> int:
        if not self.limit:
            return DEFAULT_LIMIT
        if not self.limit.isdigit() or not 1 <= int(self.limit) <= MAX_LIMIT:
            raise InvalidInput(f"limit: a page holds 1 to {MAX_LIMIT} sagas, not {self.limit[:20]!r}")
        return int(self.limit)

    def filters(self) -> dict[str, Any]:
        """The keyword filters of ``Orchestrator.page`` (``InvalidInput`` naming a bad one)."""
        found: dict[str, Any] = {"search": parse_search(self.search)}
        for name, text in self.times.items():
            found[name] = parse_time(name, text)
        return found


def parse_time(name: str, text: str) -> datetime:
    """An ISO date or date-time; one without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1) if len(text) > 10 else text)
    except ValueError:
        raise InvalidInput(f"{name}: not an ISO date or time (2024-05-01T12:00Z): {text[:40]!r}") from None
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Bar:
    """One attempt of the timeline as drawn: where its bar starts and how wide it is, in percent."""

    entry: TimelineEntry
    left: float
    width: float
    label: str
    outcome: str
    took: str
    tip: str


@dataclass(frozen=True)
class Timeline:
    """The drawn timeline: its bars, how long it spans, and the labels of its time axis."""

    bars: list[Bar]
    span: str
    ticks: list[tuple[float, str]]


def timeline_view(entries: list[TimelineEntry], status: SagaStatus, now: datetime) -> Timeline:
    """Bars whose position and width are proportional to time, from the first start to the last end."""
    if not entries:
        return Timeline([], "", [])
    final = status.updated_at if status.state.terminal else now
    ends = [e.ended_at or max(final, e.started_at) for e in entries]
    start = min(e.started_at for e in entries)
    total = max((max(ends) - start).total_seconds(), 0.001)
    bars = []
    for entry, end in zip(entries, ends, strict=True):
        left = (entry.started_at - start).total_seconds() / total * 100
        width = max((end - entry.started_at).total_seconds() / total * 100, 0.6)
        left = min(left, 100 - width)
        took = duration((end - entry.started_at).total_seconds())
        kind = {"step": "", "compensation": "undo ", "wait": "wait for ", "notification": "notify "}[entry.kind]
        label = f"{kind}{entry.name}" + (f" #{entry.attempt}" if entry.kind in ("step", "compensation") else "")
        outcome = "waiting" if entry.kind == "wait" and entry.outcome == "running" else entry.outcome
        tip = [f"{label}: {outcome}", f"started {when(entry.started_at)}", f"took {took}"]
        if entry.worker:
            tip.append(f"worker {entry.worker}")
        if entry.retry_at:
            tip.append(f"next attempt {when(entry.retry_at)}")
        if entry.error:
            tip.append(entry.error[:300])
        bars.append(Bar(entry, round(left, 3), round(width, 3), label, outcome, took, "\n".join(tip)))
    ticks = [(p, "0" if p == 0 else "+" + duration(total * p / 100)) for p in (0.0, 25.0, 50.0, 75.0, 100.0)]
    return Timeline(bars, duration(total), ticks)


def duration(seconds: float) -> str:
    """A short human duration: 850 ms, 2.4 s, 3 min 05 s, 2 h 10 min, 3 d 4 h."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def since(delta: timedelta) -> str:
    """How long after the start: 0, +2.6 ms, +1.8 s."""
    seconds = delta.total_seconds()
    return "0" if seconds <= 0 else "+" + duration(seconds)


def clock(moment: datetime) -> str:
    """The time of day in UTC, to the millisecond."""
    return moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def when(moment: datetime | None) -> str:
    """A moment in UTC, to the millisecond."""
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def until(moment: datetime, now: datetime) -> str:
    """How far ahead: ``in 3 h 05 min``; ``due`` once it has passed (a worker fires it on its next round)."""
    seconds = (moment - now).total_seconds()
    return f"in {duration(seconds)}" if seconds > 0 else "due"


def schedule_view(row: dict[str, Any], last: SagaStatus | None, now: datetime) -> dict[str, Any]:
    """What the schedules page shows of one schedule's read-model row (and of the saga it last started)."""
    upcoming = datetime.fromisoformat(row["next_fire_at"]) if row["next_fire_at"] else None
    recent = [
        {"skipped": None, **run, "tick": datetime.fromisoformat(run["tick"])}
        for run in reversed(row["runs"][-RECENT_RUNS:])
    ]
    spec = row["spec"]
    return {
        "schedule_id": row["schedule_id"],
        "saga": row["saga"],
        "when": describe(spec),
        "policies": f"catch-up {spec.get('catch_up', 'skip')}, overlap {spec.get('overlap', 'skip')}",
        "next": upcoming,
        "until": until(upcoming, now) if upcoming else "",
        "recent": recent,
        "last_saga_id": row["last_saga_id"],
        "last_state": last.state.value if last else None,
        "paused": row["paused"],
        "reason": row["reason"],
        "declared": row["declared"],
    }


def cancel_question(saga_id: str, undo: list[str], running: list[str]) -> str:
    """What the operator confirms before a cancel: the steps it undoes, in the order it undoes them."""
    lines = [f"Cancel saga {saga_id}?", ""]
    if undo:
        lines.append("This undoes these steps, in this order:")
        lines += [f"  {n}. {name}" for n, name in enumerate(undo, 1)]
    else:
        lines.append("No completed step has to be undone.")
    if running:
        lines.append(f"({', '.join(running)} is running: it is undone too if it succeeds.)")
    lines += ["", "Then the saga ends cancelled."]
    return "\n".join(lines)


def ui_url(saga_id: str) -> str:
    """The dashboard page of a saga (its id percent-encoded)."""
    return f"/ui/sagas/{quote(saga_id, safe='')}"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def compact(value: Any, limit: int = 140) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slug(text: str) -> str:
    return text.replace(" ", "-")


def tone(event_type: str) -> str:
    """The colour family of a history event."""
    if "Failed" in event_type or "TimedOut" in event_type or event_type == "SagaTerminated":
        return "bad"
    if event_type.startswith(("Compensation", "Cancel", "SagaCancelled", "SagaCompensated")):
        return "undo"
    if event_type.endswith(("Succeeded", "Completed", "Received", "Resolved")):
        return "good"
    return "plain"
