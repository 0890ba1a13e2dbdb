"""Data-change triggers: sagas started by the events of another eventsourcing application.

An upstream application (say ``Customers``, whose ``Customer.Registered`` events record that a
customer signed up) keeps its own event log; a saga declares which of its events start it::

    class Onboarding(Saga[NewCustomer]):
        triggers = [on_change(Customers, Customer.Registered, when=lambda e: e.plan != "free",
                              input=lambda e: NewCustomer(customer_id=str(e.originator_id), email=e.email))]

Every worker follows each upstream log (filtered by the triggers' topics in the database) from
the position tracked under ``triggers@<upstream name>`` in this orchestrator's tracking table,
and starts the batch's sagas and records the new position in ONE transaction: an upstream event
starts exactly one saga, after restarts and crashes too. The saga's id comes from the trigger and
the upstream event (``<trigger>:<originator id>:<version>``), so nothing can start it twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Tracking
from pydantic import BaseModel

from orchestrator.domain import ChangeTrigger
from orchestrator.errors import ConfigurationError
from orchestrator.following import BATCH, Lag, read_batch
from orchestrator.safety import derived_id, one_line
from orchestrator.storage import Database, parse_database_url
from orchestrator.triggers import decide, record_starts

if TYPE_CHECKING:
    from orchestrator.definition import Saga
    from orchestrator.registry import Registry
    from orchestrator.repository import Repository

AppT = TypeVar("AppT", bound=Application[Any])
log = structlog.get_logger("sagaworks.changes")
DECISIONS = "changes"
"""The projection rows that say, per upstream event, what each trigger did with it."""
ENVELOPE = ("originator_version", "timestamp", "originator_topic")
"""Fields of an upstream event left out of its default saga input (the id is kept, as text)."""


def event_fields(event: Any) -> dict[str, Any]:
    """An upstream event's own fields (a default saga input): JSON-native, envelope left out."""
    fields = event.model_dump(mode="json") if isinstance(event, BaseModel) else dict(vars(event))
    found = {key: value for key, value in fields.items() if key not in ENVELOPE}
    return orjson.loads(orjson.dumps(found, default=str))  # type: ignore[no-any-return]


def eventsourcing_env(database: str | Database) -> dict[str, str]:
    """The eventsourcing settings a plain ``Application`` needs to keep its events in ``database``
    (a URL): how an upstream application shares this orchestrator's PostgreSQL database."""
    db = parse_database_url(database) if isinstance(database, str) else database
    if not db.durable:
        raise ConfigurationError("an upstream application on memory:// is followed as an instance: pass it")
    env = {key: value for key, value in db.env.items() if key not in ("APPLICATION_RECORDER_TOPIC", "CREATE_TABLE")}
    return env


def open_upstream(upstream: type[AppT], database: str | Database) -> AppT:
    """An upstream application keeping its events in ``database`` (its PostgreSQL schema made if
    missing, as the orchestrator makes its own)."""
    db = parse_database_url(database) if isinstance(database, str) else database
    env = eventsourcing_env(db)
    if db.is_postgres:
        from psycopg.sql import SQL, Identifier

        from orchestrator.storage.postgres import connect

        with connect(db.env) as conn:
            conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(db.env["POSTGRES_SCHEMA"])))
    return upstream(env=env)


class ChangeProcessor:
    """Follows one upstream application's log and starts the sagas its events trigger."""

    def __init__(
        self,
        upstream: Application[Any],
        triggers: list[tuple[type[Saga[Any]], ChangeTrigger]],
        repository: Repository,
        max_bytes: int,
    ) -> None:
        self.upstream = upstream
        self.triggers = triggers
        self.repository = repository
        self.max_bytes = max_bytes
        self.tracking_name = f"triggers@{upstream.name}"
        """The name its position is tracked under (in this orchestrator's tracking table)."""

    def catch_up(self, limit: int = BATCH) -> int:
        """Process one batch of upstream events after the tracked position; how many it read (0: none new)."""
        index = self.repository.index
        position = index.tracked(self.tracking_name) or 0
        topics = sorted({trigger.topic for _, trigger in self.triggers})
        notifications, reached = read_batch(self.upstream.recorder, position, limit, topics)
        if reached == position:
            return 0
        starts: dict[str, Any] = {}
        rows: list[tuple[str, str, bytes | None]] = []
        for notification in notifications:
            event = self.upstream.mapper.to_domain_event(notification)
            decisions = []
            for saga, trigger in self.triggers:
                if notification.topic != trigger.topic:
                    continue
                label = trigger.named(saga.name)
                saga_id = derived_id(label, str(event.originator_id), str(event.originator_version))
                pool = None if trigger.limits is None else (label, trigger.limits)
                fields = event_fields(event)
                decision, aggregate = decide(
                    saga, label, saga_id, event, trigger.when, trigger.input, fields, self.max_bytes, pool
                )
                decisions.append(decision)
                if aggregate is not None:
                    starts.setdefault(saga_id, aggregate)
            rows.append((DECISIONS, f"{self.upstream.name}:{notification.id}", orjson.dumps(decisions)))
        try:
            record_starts(self.repository, list(starts.values()), rows, Tracking(self.tracking_name, reached))
        except IntegrityError:
            return 0  # another worker recorded this batch first
        return len(notifications) or 1

    def drain(self) -> int:
        """Process batches until caught up with the upstream log; batches recorded."""
        rounds = 0
        while self.catch_up():
            rounds += 1
        return rounds

    def lag(self) -> Lag:
        """How many upstream notifications are not processed yet (and nothing about their age)."""
        position = self.repository.index.tracked(self.tracking_name) or 0
        head = self.upstream.recorder.max_notification_id() or 0
        return Lag(max(0, head - position), 0.0)

    def decisions(self, notification_id: int) -> list[dict[str, Any]] | None:
        """What the triggers did with one upstream event (``None``: not processed, or not of their topics)."""
        found = self.repository.index.read_rows(DECISIONS, [f"{self.upstream.name}:{notification_id}"])
        return next((orjson.loads(doc) for doc in found.values()), None)


class Changes:
    """The side task workers run: follow every upstream application some saga's triggers name."""

    name = "changes"

    def __init__(
        self,
        registry: Registry,
        repository: Repository,
        database: Database,
        upstreams: Mapping[type[Application[Any]], str | Application[Any]],
        max_bytes: int,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.database = database
        self.upstreams = dict(upstreams)
        self.max_bytes = max_bytes
        self._processors: dict[str, ChangeProcessor] = {}
        self._failures: dict[str, int] = {}
        self._open_error: str | None = None
        self._resume_at: dict[str, float] = {}

    def processors(self) -> list[ChangeProcessor]:
        """One processor per upstream application the registered sagas' triggers follow."""
        wanted: dict[type[Application[Any]], list[tuple[type[Saga[Any]], ChangeTrigger]]] = {}
        for saga in self.registry:
            for trigger in saga.triggers:
                if isinstance(trigger, ChangeTrigger):
                    wanted.setdefault(trigger.upstream, []).append((saga, trigger))
        found = []
        for upstream, triggers in wanted.items():
            processor = self._processors.get(upstream.name)
            if processor is None or processor.triggers != triggers:
                processor = ChangeProcessor(self._open(upstream), triggers, self.repository, self.max_bytes)
                self._processors[upstream.name] = processor
            found.append(processor)
        return found

    def processor(self, upstream: type[Application[Any]] | str) -> ChangeProcessor:
        """The processor that follows ``upstream`` (its class or name)."""
        name = upstream if isinstance(upstream, str) else upstream.name
        for processor in self.processors():
            if processor.upstream.name == name:
                return processor
        raise ConfigurationError(f"no saga's triggers follow an application named {name!r}")

    def run(self) -> float | None:
        try:
            processors = self.processors()
        except Exception as error:  # an upstream that cannot be opened (misconfigured, or down)
            text = f"{type(error).__name__}: {one_line(error)}"
            if text != self._open_error:
                log.error("cannot open an upstream application", error=text)
                self._open_error = text
            return 5.0
        self._open_error = None
        if not processors:
            return 5.0
        read = 0
        now = time.monotonic()
        for processor in processors:
            name = processor.upstream.name
            if now < self._resume_at.get(name, 0.0):
                continue
            try:
                read += processor.catch_up()
            except Exception as error:  # the upstream's database down, say: only this follower waits
                tries = self._failures[name] = self._failures.get(name, 0) + 1
                self._resume_at[name] = now + min(30.0, 0.5 * 2**tries)
                if tries == 1:
                    log.warning(
                        "cannot follow an upstream application; trying again with backoff",
                        upstream=name,
                        error=f"{type(error).__name__}: {one_line(error)}",
                    )
            else:
                if self._failures.pop(name, 0):
                    log.info("following the upstream application again", upstream=name)
        return 0.0 if read else 0.5

    def _open(self, upstream: type[Application[Any]]) -> Application[Any]:
        source = self.upstreams.get(upstream)
        if isinstance(source, Application):
            return source
        database = parse_database_url(source) if source is not None else self.database
        if database.kind == "sqlite" and database.env["SQLITE_DBNAME"] == self.database.env.get("SQLITE_DBNAME"):
            raise ConfigurationError(
                f"on SQLite, {upstream.name} keeps its events in a file of its own: "
                f"Orchestrator(upstreams={{{upstream.__name__}: 'sqlite:///{upstream.name.lower()}.db'}})"
            )
        return open_upstream(upstream, database)
