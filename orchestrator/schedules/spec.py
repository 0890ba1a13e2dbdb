"""What a schedule says: when it ticks (a cron expression, an interval, or once), in which time zone,
with what input, and what it does after downtime (catch-up) or while its last run still goes (overlap).

Ticks come from croniter (the pallets-eco project) in the schedule's time zone, with its DST rules:
a time that does not exist on the day clocks go forward fires once at the next valid time, one
that exists twice on the day they go back fires at both.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import DefinitionError
from orchestrator.safety import problems

CatchUp = Literal["skip", "latest", "all"]
Overlap = Literal["skip", "buffer", "allow"]
ON_TIME = timedelta(minutes=1)
"""A tick is on time while it is younger than this; ``catch_up="skip"`` fires only such ticks."""
MAX_FIRES = 1_000
"""Ticks one look at a schedule fires at most (``catch_up="all"`` after long downtime: the rest next)."""


class ScheduleSpec(BaseModel):
    """A schedule's definition (what ``cron``, ``every`` and ``once`` make)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    saga: str = ""
    """The saga it starts (filled in when declared on a saga class)."""
    cron: str | None = None
    every: float | None = Field(default=None, gt=0)
    """Seconds between ticks, counted from ``start`` (or the schedule's creation)."""
    at: datetime | None = None
    """The one tick of a one-off schedule."""
    tz: str = "UTC"
    input: dict[str, Any] = Field(default_factory=dict)
    catch_up: CatchUp = "skip"
    catch_up_window: float = Field(default=86_400.0, gt=0)
    """With ``catch_up="all"``: how far back missed ticks are still run, in seconds."""
    overlap: Overlap = "skip"
    jitter: float = Field(default=0.0, ge=0)
    """Up to this many seconds of delay per tick (the same for every worker: derived from the tick)."""
    start: datetime | None = None
    end: datetime | None = None
    name: str | None = None
    """Names a schedule declared on a saga class (default: its position in ``schedules``)."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"not a cron expression croniter understands: {value!r}")
        return value

    @field_validator("tz")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSpec:
        kinds = [k for k in ("cron", "every", "at") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a schedule has exactly one of cron, every or at")
        for moment in (self.at, self.start, self.end):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError("at, start and end are timezone-aware datetimes")
        if self.start and self.end and self.end <= self.start:
            raise ValueError("end must come after start")
        return self

    def ticks(self, after: datetime, until: datetime, origin: datetime) -> Iterator[datetime]:
        """The ticks in ``(after, until]``, in order (aware, in the schedule's time zone); ``origin`` is
        when the schedule was created (an interval counts from ``start``, else from it)."""
        after, until = self._bounds(after, until)
        zone = ZoneInfo(self.tz)
        if self.at is not None:
            if after < self.at <= until:
                yield self.at.astimezone(zone)
            return
        if self.every is not None:
            first, step = self.start or origin, timedelta(seconds=self.every)
            tick = first + max(0, (after - first) // step + 1) * step
            while tick <= until:
                yield tick.astimezone(zone)
                tick += step
            return
        assert self.cron is not None
        it = croniter(self.cron, after.astimezone(zone))  # local time, so DST follows the zone's rules
        while (tick := it.get_next(datetime)) <= until:
            yield tick

    def latest(self, after: datetime, until: datetime, origin: datetime) -> datetime | None:
        """The last tick in ``(after, until]`` (found without walking the ticks: downtime may be long)."""
        after, until = self._bounds(after, until)
        if until <= after:
            return None
        zone = ZoneInfo(self.tz)
        if self.at is not None:
            return self.at.astimezone(zone) if after < self.at <= until else None
        if self.every is not None:
            first, step = self.start or origin, timedelta(seconds=self.every)
            if until < first:
                return None
            tick = first + ((until - first) // step) * step
        else:
            assert self.cron is not None
            tick = croniter(self.cron, (until + timedelta(microseconds=1)).astimezone(zone)).get_prev(datetime)
        return tick.astimezone(zone) if tick > after else None

    def due(self, last: datetime | None, created: datetime, now: datetime) -> tuple[list[datetime], datetime | None]:
        """The ticks to fire now, after the last one dealt with, by the catch-up policy; and the latest
        tick the policy lets go unfired (``None``: none), which the schedule records as skipped."""
        after = last or min(created, self.start or created)
        if self.catch_up == "all":
            window = max(after, now - timedelta(seconds=self.catch_up_window))
            fire = list(itertools.islice(self.ticks(window, now, created), MAX_FIRES))
            return fire, self.latest(after, window, created)
        latest = self.latest(after, now, created)
        if latest is None:
            return [], None
        if self.catch_up == "latest" or now - latest < ON_TIME:
            return [latest], None
        return [], latest

    def _bounds(self, after: datetime, until: datetime) -> tuple[datetime, datetime]:
        if self.start is not None and after < self.start:
            after = self.start - timedelta(microseconds=1)  # a tick at start itself counts
        if self.end is not None:
            until = min(until, self.end)
        return after, until

    def next_tick(self, after: datetime, origin: datetime) -> datetime | None:
        """The first tick after ``after``, however far ahead (``None``: the schedule has ended)."""
        after, _ = self._bounds(after, after)
        zone = ZoneInfo(self.tz)
        if self.at is not None:
            tick: datetime | None = self.at if self.at > after else None
        elif self.every is not None:
            first, step = self.start or origin, timedelta(seconds=self.every)
            tick = first + max(0, (after - first) // step + 1) * step
        else:
            assert self.cron is not None
            tick = croniter(self.cron, after.astimezone(zone)).get_next(datetime)
        if tick is None or (self.end is not None and tick > self.end):
            return None
        return tick.astimezone(zone)

    def delay(self, schedule_id: str, tick: datetime) -> timedelta:
        """This tick's jitter: the same for every worker (derived from the schedule and the tick)."""
        if not self.jitter:
            return timedelta(0)
        digest = hashlib.sha256(f"{schedule_id}|{tick.isoformat()}".encode()).digest()
        return timedelta(seconds=self.jitter * int.from_bytes(digest[:4], "big") / 2**32)


def build(error: type[Exception] = DefinitionError, **fields: Any) -> ScheduleSpec:
    """A spec from keywords (``cron=``, ``every=`` seconds or a timedelta, ``at=``, ``tz=``, ``input=``
    a model or a dict, the policies); a bad one raises ``error`` naming what is wrong."""
    if isinstance(fields.get("every"), timedelta):
        fields["every"] = fields["every"].total_seconds()
    fields["input"] = _input(fields.get("input"), error)
    try:
        return ScheduleSpec(**fields)
    except ValidationError as invalid:
        raise error(f"bad schedule: {problems(invalid)}") from None


def cron(expression: str, *, tz: str = "UTC", input: Any = None, **options: Any) -> ScheduleSpec:
    """Tick by a cron expression in the time zone ``tz`` (``catch_up``, ``overlap``, ``jitter``, ``start``,
    ``end``, ``name`` as keywords); ``input`` is the saga's input (a model or a dict)."""
    return build(cron=expression, tz=tz, input=input, **options)


def every(interval: float | timedelta, *, input: Any = None, **options: Any) -> ScheduleSpec:
    """Tick every ``interval`` (seconds or a timedelta) from ``start``, or from the schedule's creation."""
    return build(every=interval, input=input, **options)


def once(at: datetime, *, input: Any = None, **options: Any) -> ScheduleSpec:
    """Tick once, at ``at`` (a timezone-aware datetime)."""
    return build(at=at, input=input, **options)


def _input(value: Any, error: type[Exception]) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        dumped: dict[str, Any] = value.model_dump(mode="json")
        return dumped
    if isinstance(value, dict):
        return value
    raise error(f"a schedule's input is a model or a dict, not {type(value).__name__}")


def utc(moment: datetime) -> str:
    """A tick as it appears in saga ids: UTC, ISO 8601."""
    return moment.astimezone(UTC).isoformat()


def describe(spec: dict[str, Any]) -> str:
    """When a schedule fires, from its row's ``spec``: ``0 9 * * 1-5 (Europe/Paris)``, ``every 30 s (UTC)``."""
    if spec.get("cron"):
        when = str(spec["cron"])
    elif spec.get("every") is not None:
        when = f"every {float(spec['every']):g} s"
    else:
        when = f"at {spec.get('at')}"
    return f"{when} ({spec.get('tz', 'UTC')})"
