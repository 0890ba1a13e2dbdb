"""Schedules at work: declared ones are kept in step with the code, run-time ones are managed
(``orch.schedule(...)``, ``saga schedules ...``), and every worker's scheduler fires what is due.

Each tick starts its saga exactly once, however many workers race: the saga's id comes from the
schedule and the tick (so a second start of a tick is ``start``'s idempotent no-op), and the tick
is recorded on the schedule in the same transaction as the saga's start, under the schedule's
version (a second worker's save of the same tick is refused).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.errors import InvalidInput, InvalidTransition, ScheduleNotFound
from orchestrator.readmodels.status import index_entry
from orchestrator.safety import check_saga_id, check_text, one_line, short
from orchestrator.schedules import aggregate as sa
from orchestrator.schedules.spec import ScheduleSpec, utc
from orchestrator.storage import is_transient

if TYPE_CHECKING:
    from orchestrator.registry import Registry
    from orchestrator.repository import Repository

ROWS = "schedules"
"""The projection rows of the schedules' read model (one per schedule)."""
UNDECLARED = "no longer declared by the code"
MAX_ID = 150
"""Longest schedule id: ``schedule:<id>:manual:<tick>`` must stay a valid saga id (200)."""
log = structlog.get_logger("sagaworks.schedules")


class Scheduler:
    """Manages schedules and fires their due ticks (as a worker's side task, ``run``)."""

    name = "scheduler"

    def __init__(
        self, repository: Repository, registry: Registry, max_bytes: int, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.repository = repository
        self.registry = registry
        self.max_bytes = max_bytes
        self.clock = clock or (lambda: datetime.now(UTC))
        """Now, as an aware datetime (tests drive schedules with a clock of their own)."""
        self.max_wait = 5.0
        """Longest pause between two looks at the schedules (new and edited ones are seen this soon)."""
        self.declared_done = False
        self.problems: dict[str, str] = {}
        """The last error each schedule met, as logged (a schedule whose saga is gone, say)."""

    # Management

    def create(self, saga: Any, spec: ScheduleSpec, schedule_id: str | None = None, *, declared: bool = False) -> str:
        """Create a schedule (or, for an existing id, edit it to ``spec``); returns its id."""
        saga_class = self.registry.saga_class(saga)
        spec = spec.model_copy(update={"saga": saga_class.name})
        SagaAggregate.begin(saga_class, spec.input, "schedule-input-check", None, self.max_bytes)  # bad input: now
        if schedule_id is None:  # the same saga and definition: the same schedule; any change: another
            digest = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:12]
            schedule_id = f"{saga_class.name[:120]}.{digest}"
        schedule_id = check_saga_id(schedule_id)
        if len(schedule_id) > MAX_ID:
            raise InvalidInput(f"a schedule id has at most {MAX_ID} characters (its sagas' ids add a tick)")
        try:
            schedule = self.load(schedule_id)
        except ScheduleNotFound:
            schedule = sa.Schedule.new(schedule_id, spec, self.clock(), declared)
        else:
            if schedule.deleted:
                raise InvalidTransition(f"schedule {short(schedule_id)} was deleted; use another id")
            if schedule.spec != spec:
                schedule.record(sa.ScheduleEdited, self.clock(), spec=spec)
        self._save(schedule)
        return schedule_id

    def pause(self, schedule_id: str, reason: str | None = None) -> None:
        """Stop a schedule firing until ``resume``."""
        reason = check_text(reason, "a reason")
        self._change(
            schedule_id, lambda s: None if s.paused else s.record(sa.SchedulePaused, self.clock(), reason=reason)
        )

    def resume(self, schedule_id: str) -> None:
        """Let a paused schedule fire again."""
        self._change(schedule_id, lambda s: s.record(sa.ScheduleResumed, self.clock()) if s.paused else None)

    def delete(self, schedule_id: str) -> None:
        """Delete a schedule: it fires no more (its history stays)."""
        self._change(schedule_id, lambda s: None if s.deleted else s.record(sa.ScheduleDeleted, self.clock()))

    def trigger(self, schedule_id: str) -> str:
        """Fire the schedule now, off the clock; returns the saga id."""
        schedule = self._live(schedule_id)
        now = self.clock()
        saga_id = f"schedule:{schedule_id}:manual:{utc(now)}"
        self._fire(schedule, [(now, saga_id, True)])
        return saga_id

    def backfill(self, schedule_id: str, start: datetime, end: datetime) -> list[str]:
        """Fire every tick in ``[start, end)`` that has not started its saga yet; the saga ids of them all."""
        if start.utcoffset() is None or end.utcoffset() is None or end <= start:
            raise InvalidInput("backfill takes timezone-aware start < end")
        schedule = self._live(schedule_id)
        ticks = list(
            schedule.spec.ticks(start - timedelta(microseconds=1), end - timedelta(microseconds=1), schedule.created)
        )
        if len(ticks) > 10_000:
            raise InvalidInput(f"backfill would start {len(ticks):,} sagas; narrow the range")
        fires = [(tick, self.saga_id(schedule_id, tick), True) for tick in ticks]
        self._fire(schedule, fires)
        return [saga_id for _, saga_id, _ in fires]

    def rows(self) -> list[dict[str, Any]]:
        """Every schedule's row: its definition, next fire time, last runs; deleted ones left out."""
        rows = self.repository.index.read_rows(ROWS)
        found = [orjson.loads(doc) for doc in rows.values()]
        return [row for row in sorted(found, key=lambda r: r["schedule_id"]) if not row["deleted"]]

    def load(self, schedule_id: str) -> sa.Schedule:
        """A schedule's aggregate."""
        try:
            schedule: sa.Schedule = self.repository.store.repository.get(sa.schedule_uuid(schedule_id))
        except AggregateNotFoundError:
            raise ScheduleNotFound(f"no schedule with id {short(schedule_id)}") from None
        return schedule

    @staticmethod
    def saga_id(schedule_id: str, tick: datetime) -> str:
        """The id of the saga a tick starts: from the schedule and the tick, so it starts once."""
        return f"schedule:{schedule_id}:{utc(tick)}"

    # The clock

    def run(self) -> float | None:
        """Fire what is due now; seconds until the next tick of any schedule (at most ``max_wait``)."""
        if not self.declared_done:
            self.declare()
        now = self.clock()
        wait = self.max_wait
        for row in self.rows():
            upcoming = row["next_fire_at"]
            if row["paused"] or (upcoming is None and row["buffered"] is None):
                continue
            if upcoming is not None and datetime.fromisoformat(upcoming) > now and row["buffered"] is None:
                wait = min(wait, (datetime.fromisoformat(upcoming) - now).total_seconds())
                continue
            try:
                self.tick(row["schedule_id"], now)
            except IntegrityError:
                pass  # another worker recorded this tick first
            except Exception as error:  # one broken schedule (its saga gone, say) must not stop the others
                if is_transient(error):
                    raise
                self._problem(row["schedule_id"], error)
        return max(0.01, wait)

    def tick(self, schedule_id: str, now: datetime) -> None:
        """Deal with the ticks of one schedule that are due at ``now``: fire, skip or hold them back."""
        schedule = self.load(schedule_id)
        if schedule.paused or schedule.deleted:
            return
        spec = schedule.spec
        ticks, missed = spec.due(schedule.last_tick, schedule.created, now)
        if missed is not None:
            reason = f"missed while no scheduler ran (catch-up policy {spec.catch_up!r})"
            schedule.record(sa.ScheduleSkipped, now, tick=missed, reason=reason)
        if schedule.buffered is not None and self._previous_ended(schedule):
            ticks = [schedule.buffered, *[t for t in ticks if t != schedule.buffered]]
        fires: list[tuple[datetime, str, bool]] = []
        for tick in ticks:
            running = fires or not self._previous_ended(schedule)
            if spec.overlap == "allow" or not running:
                fires.append((tick, self.saga_id(schedule_id, tick), False))
            elif spec.overlap == "buffer":
                schedule.record(sa.ScheduleBuffered, now, tick=tick)
            else:
                schedule.record(sa.ScheduleSkipped, now, tick=tick, reason="the previous run was still going")
        if fires or schedule.pending_events:
            self._fire(schedule, fires)

    def declare(self) -> None:
        """Bring the schedules the registered saga classes declare in step with the code: create new
        ones, edit changed ones; one the code no longer declares is paused (resumed if declared again).
        A declared schedule deleted by hand stays deleted."""
        declared = {
            spec.name or f"{saga.name}.{index}": spec.model_copy(update={"saga": saga.name})
            for saga in self.registry
            for index, spec in enumerate(saga.schedules)
        }
        for schedule_id, spec in declared.items():
            for attempt in range(2):  # another worker starting at the same time may create it first
                try:
                    self._declare(schedule_id, spec)
                    break
                except IntegrityError:
                    if attempt:
                        raise
        for row in self.rows():
            if (
                row["declared"]
                and row["schedule_id"] not in declared
                and row["saga"] in self.registry.sagas  # another app's sagas: theirs to declare
                and not row["paused"]
            ):
                with contextlib.suppress(IntegrityError):
                    self.pause(row["schedule_id"], UNDECLARED)
        self.declared_done = True

    def _declare(self, schedule_id: str, spec: ScheduleSpec) -> None:
        try:
            schedule = self.load(schedule_id)
        except ScheduleNotFound:
            self.create(spec.saga, spec, schedule_id, declared=True)
            return
        if schedule.deleted:
            return
        now = self.clock()
        if schedule.spec != spec:
            schedule.record(sa.ScheduleEdited, now, spec=spec)
        if schedule.paused and schedule.reason == UNDECLARED:
            schedule.record(sa.ScheduleResumed, now)
        if schedule.pending_events:
            self._save(schedule)

    # Internals

    def _problem(self, schedule_id: str, error: Exception) -> None:
        text = f"{type(error).__name__}: {one_line(error)}"
        if self.problems.get(schedule_id) != text:  # once per problem, not every few seconds
            log.error("schedule cannot fire", schedule_id=schedule_id, error=text)
            self.problems[schedule_id] = text

    def _previous_ended(self, schedule: sa.Schedule) -> bool:
        if schedule.last_saga_id is None:
            return True
        doc = self.repository.index.get_status(aggregate_id(schedule.last_saga_id))
        return doc is None or orjson.loads(doc)["state"] in ("completed", "compensated", "cancelled", "failed")

    def _fire(self, schedule: sa.Schedule, fires: list[tuple[datetime, str, bool]]) -> None:
        saga_class = self.registry.saga_class(schedule.spec.saga)
        existing, broken = self.repository.load_many([aggregate_id(saga_id) for _, saga_id, _ in fires])
        starts = []
        now = self.clock()
        for tick, saga_id, manual in fires:
            if aggregate_id(saga_id) not in existing.keys() | broken.keys():  # fired already (by hand, a backfill)
                delay = schedule.spec.delay(schedule.schedule_id, tick)
                start_at = tick + delay if delay else None
                starts.append(SagaAggregate.begin(saga_class, schedule.spec.input, saga_id, start_at, self.max_bytes))
            schedule.record(sa.ScheduleFired, now, tick=tick, saga_id=saga_id, manual=manual)
        events = [e for aggregate in starts for e in aggregate.collect_events()]
        self._save(schedule, events, [index_entry(a) for a in starts])
        for tick, saga_id, manual in fires:
            log.info(
                "schedule fired",
                schedule_id=schedule.schedule_id,
                tick=tick.isoformat(),
                saga_id=saga_id,
                manual=manual,
            )

    def _save(self, schedule: sa.Schedule, events: list[Any] | None = None, entries: list[Any] | None = None) -> None:
        row = [(ROWS, schedule.schedule_id, orjson.dumps(schedule.row()))]
        with self.repository.translating("saving a schedule"):
            self.repository.store.events.put(
                [*schedule.collect_events(), *(events or [])], index=entries or [], rows=row
            )
        if events:
            self.repository.wake_workers()

    def _live(self, schedule_id: str) -> sa.Schedule:
        schedule = self.load(schedule_id)
        if schedule.deleted:
            raise InvalidTransition(f"schedule {short(schedule_id)} was deleted")
        return schedule

    def _change(self, schedule_id: str, change: Callable[[sa.Schedule], None]) -> None:
        schedule = self._live(schedule_id)
        change(schedule)
        if schedule.pending_events:
            self._save(schedule)
