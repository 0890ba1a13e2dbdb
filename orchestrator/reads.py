"""What an ``Orchestrator`` answers: a saga's status (now or then), its history and timeline, lists,
pages and counts of sagas, and the read models users write."""

from __future__ import annotations

import builtins
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator.aggregate import aggregate_id
from orchestrator.domain import DomainEventRecorded, EventInfo
from orchestrator.errors import InvalidInput, SagaNotFound
from orchestrator.following import TOPICS
from orchestrator.notify import timeline_entries
from orchestrator.readmodels.history import HistoryEvent, history_entries
from orchestrator.readmodels.listing import MAX_PAGE, Filters, SagaPage, encode_cursor
from orchestrator.readmodels.status import SagaStatus, status_of
from orchestrator.readmodels.timeline import TimelineEntry, timeline_of
from orchestrator.registry import Registry, SagaRef
from orchestrator.repository import Repository
from orchestrator.safety import check_saga_id, short
from orchestrator.states import SagaState
from orchestrator.triggers import DECISIONS

if TYPE_CHECKING:
    from orchestrator.following import Follower, Log
    from orchestrator.notify import Notifications


class Reads:
    """The queries of an ``Orchestrator`` (it supplies the repository, the registry and the followers)."""

    repository: Repository
    registry: Registry
    projections: dict[str, Follower]
    log: Log
    notifications: Notifications

    def status(self, saga_id: str) -> SagaStatus:
        """The saga's status, from the status read model (current as soon as ``start`` returns)."""
        with self.repository.translating("reading a status"):
            doc = self.repository.index.get_status(aggregate_id(check_saga_id(saga_id)))
        if doc is None:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return SagaStatus.model_validate_json(doc)

    def wait(self, saga_id: str, timeout: float | None = None) -> SagaStatus:
        """Block until the saga is terminal and return its status; ``TimeoutError`` after ``timeout`` s.

        Waiting runs nothing: a worker (``run_worker`` or ``saga worker``) must be running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            status = self.status(saga_id)
            if status.state.terminal:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"saga {short(saga_id)} is still {status.state.value} after {timeout} s")
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)

    def list(
        self,
        state: SagaState | str | None = None,
        saga: SagaRef | None = None,
        limit: int | None = None,
        **filters: Any,
    ) -> builtins.list[SagaStatus]:
        """Sagas, most recently updated first: all that match, or the first ``limit``.

        Filters: ``state``, ``saga``, ``created_after``/``created_before``,
        ``updated_after``/``updated_before`` (aware datetimes), ``search={"field": value}`` (input
        fields the saga class declares in ``search``). ``page`` gives them a page at a time.
        """
        found: builtins.list[SagaStatus] = []
        cursor = None
        while True:
            size = MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(found))
            page = self.page(state, saga, limit=size, cursor=cursor, **filters)
            found += page.items
            cursor = page.next_cursor
            if cursor is None or (limit is not None and len(found) >= limit):
                return found

    def page(
        self,
        state: SagaState | str | None = None,
        saga: SagaRef | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
        **filters: Any,
    ) -> SagaPage:
        """One page of ``list``: up to ``limit`` sagas (at most 1000) and the cursor of the next page."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}, not {short(limit)}")
        query = self._filters(state, saga, filters).query(cursor)
        with self.repository.translating("listing sagas"):
            docs = self.repository.index.list_status(query, limit + 1)
        items = [SagaStatus.model_validate_json(doc) for doc in docs[:limit]]
        return SagaPage(items=items, next_cursor=encode_cursor(items[-1]) if len(docs) > limit else None)

    def counts(
        self, state: SagaState | str | None = None, saga: SagaRef | None = None, **filters: Any
    ) -> dict[str, dict[str, int]]:
        """How many sagas there are by saga name and state (with the filters of ``list``)."""
        query = self._filters(state, saga, filters).query()
        with self.repository.translating("counting sagas"):
            rows = self.repository.index.count_status(query)
        counts: dict[str, dict[str, int]] = {}
        for name, state_, n in rows:
            counts.setdefault(name, {})[state_] = n
        return counts

    def _filters(self, state: SagaState | str | None, saga: SagaRef | None, filters: dict[str, Any]) -> Filters:
        name = None if saga is None else self.registry.saga_class(saga).name
        try:
            return Filters(state=state, saga=name, **filters)
        except TypeError:
            known = "created_after, created_before, updated_after, updated_before, search"
            raise InvalidInput(f"unknown filter among {', '.join(filters)}; filters are {known}") from None

    def status_at(self, saga_id: str, when: datetime) -> SagaStatus:
        """The saga's status as it was at ``when`` (an aware datetime), folded from its history."""
        if not isinstance(when, datetime) or when.utcoffset() is None:
            raise InvalidInput(f"when must be a timezone-aware datetime, not {short(when)}")
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        aggregate: Any = None
        for event in events:
            if event.timestamp > when:
                break
            aggregate = event.mutate(aggregate)
        if aggregate is None:
            raise SagaNotFound(f"saga {short(saga_id)} was started after {when.isoformat()}")
        return status_of(aggregate.run)

    def timeline(self, saga_id: str) -> builtins.list[TimelineEntry]:
        """Every attempt of every step, compensation and wait of the saga, in order, with its timing."""
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
            deliveries = self.repository.index.deliveries_of(aggregate_id(saga_id))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return [*timeline_of(events), *timeline_entries(deliveries)]

    def history(self, saga_id: str) -> builtins.list[HistoryEvent]:
        """The saga's events in order: its whole life, the truth everything else derives from."""
        with self.repository.translating("reading a history"):
            events = self.repository.events(aggregate_id(check_saga_id(saga_id)))
        if not events:
            raise SagaNotFound(f"no saga with id {short(saga_id)}")
        return history_entries(events)

    def events(self, name: str | None = None, *, after: int = 0, limit: int = 100) -> builtins.list[EventInfo]:
        """Domain events in the order they were recorded (``after``: a position), with what the triggers
        did with each; ``name`` keeps only those of that name."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}, not {short(limit)}")
        if not isinstance(after, int) or not 0 <= after < 2**63:
            raise InvalidInput(f"after is a position in the log (0 or more), not {short(after)}")
        store = self.repository.store
        topics = [TOPICS["DomainEventRecorded"], TOPICS["DomainEventEmitted"]]
        found: builtins.list[EventInfo] = []
        position = after
        with self.repository.translating("listing events"):
            while len(found) < limit:
                batch = store.recorder.select_notifications(position, 500, topics=topics, inclusive_of_start=False)
                for n in batch:
                    event: Any = store.mapper.to_domain_event(n)
                    info: tuple[str, str, dict[str, Any], str | None]
                    if isinstance(event, DomainEventRecorded):
                        info = (event.event_id, event.name, event.data, None)
                    else:
                        doc = self.repository.index.get_status(event.originator_id)
                        source = orjson.loads(doc)["saga_id"] if doc else str(event.originator_id)
                        info = (f"{event.originator_id}:{event.originator_version}", event.event, event.data, source)
                    if name is None or info[1] == name:
                        event_id, event_name, data, source = info
                        found.append(
                            EventInfo(
                                position=n.id,
                                event_id=event_id,
                                name=event_name,
                                data=data,
                                timestamp=event.timestamp,
                                source=source,
                            )
                        )
                if len(batch) < 500:
                    break
                position = batch[-1].id
            found = found[:limit]
            decided = self.repository.index.read_rows(DECISIONS, [e.event_id for e in found])
        return [
            e.model_copy(update={"triggers": orjson.loads(decided[e.event_id])}) if e.event_id in decided else e
            for e in found
        ]

    def projection(self, name: str, key: str | None = None) -> Any:
        """A projection's rows by key (``key``: that row, or ``None`` if it has none)."""
        self._projection(name)
        with self.repository.translating("reading a projection"):
            rows = self.repository.index.read_rows(name, None if key is None else [key])
        decoded = {k: orjson.loads(v) for k, v in rows.items()}
        return decoded if key is None else decoded.get(key)

    def projection_lag(self) -> dict[str, dict[str, float]]:
        """How far each follower of the log (the registered projections, and the notifications queue)
        is behind it: ``lag_events``, ``lag_seconds``."""
        lags = {}
        followers: dict[str, Follower] = {**self.projections, "notifications": self.notifications.notifier}
        for name, follower in followers.items():
            lag = self.log.lag(follower)
            lags[name] = {"lag_events": float(lag.events), "lag_seconds": round(lag.seconds, 3)}
        return lags

    def _projection(self, name: str) -> Follower:
        if name not in self.projections:
            known = ", ".join(sorted(self.projections)) or "none"
            raise InvalidInput(f"no projection named {short(name)}; registered: {known}")
        return self.projections[name]
