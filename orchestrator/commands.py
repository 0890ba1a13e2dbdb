"""What an ``Orchestrator`` does to sagas: start them (one, many, or from a coroutine), deliver events
to them, cancel, retry and resolve them. Each is a save shared with the concurrent commands of the
process (group commit, ``commits.py``), but ``start_many``, one transaction of its own."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from eventsourcing.persistence import IntegrityError
from pydantic import BaseModel

from orchestrator import metrics
from orchestrator.aggregate import SagaAggregate, aggregate_id
from orchestrator.errors import (
    InvalidInput,
    InvalidTransition,
    SagaAlreadyStarted,
    SagaNotFound,
    UnexpectedEvent,
)
from orchestrator.registry import Registry, SagaRef
from orchestrator.repository import Repository
from orchestrator.safety import check_saga_id, check_text, event_payload, short
from orchestrator.settings import Settings
from orchestrator.states import SagaState

COMMAND_OUTAGES = 3
"""Transient storage errors a command waits out (about 1.4 s in all) before it reports one."""


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


class Commands:
    """The commands of an ``Orchestrator`` (it supplies the settings, the registry and the repository)."""

    settings: Settings
    registry: Registry
    repository: Repository

    def start(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        start_at: datetime | None = None,
        notify: str | None = None,
    ) -> str:
        """Start a saga and return its id; nothing runs until a worker picks it up.

        ``saga_id`` makes the start idempotent: a repeat with the same saga and input returns
        the id and starts nothing; with a different saga or input it raises ``SagaAlreadyStarted``.
        ``notify`` is a URL that gets the final status as a signed JSON POST once the saga ends.
        """
        aggregate = self._begin(saga, input, saga_id, start_at, notify)
        try:
            with self.repository.translating("starting a saga"):
                self.repository.save([aggregate], group=True)
        except IntegrityError:
            self._started_before(aggregate)
        else:
            metrics.SAGAS_STARTED.labels(aggregate.run.saga).inc()
        return aggregate.run.saga_id

    async def start_async(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        *,
        saga_id: str | None = None,
        start_at: datetime | None = None,
        notify: str | None = None,
    ) -> str:
        """``start`` for a coroutine (an ASGI handler, an asyncio service): the same answer and errors,
        but the event loop goes on while the start commits, with every other start, send, cancel and
        retry of this process that arrives meanwhile (group commit), and no thread is taken per call."""
        aggregate = self._begin(saga, input, saga_id, start_at, notify)
        try:
            with self.repository.translating("starting a saga"):
                await self.repository.save_async([aggregate])
        except IntegrityError:
            await asyncio.to_thread(self._started_before, aggregate)
        else:
            metrics.SAGAS_STARTED.labels(aggregate.run.saga).inc()
        return aggregate.run.saga_id

    def _begin(
        self,
        saga: SagaRef,
        input: BaseModel | dict[str, Any],
        saga_id: str | None,
        start_at: datetime | None,
        notify: str | None,
    ) -> SagaAggregate:
        saga_class = self.registry.saga_class(saga)
        return SagaAggregate.begin(saga_class, input, saga_id, start_at, self.settings.max_input_bytes, notify)

    def _started_before(self, aggregate: SagaAggregate) -> None:
        """A start's id is taken: fine if by the same start (a repeat, or our own commit whose
        acknowledgement was lost), else ``SagaAlreadyStarted``."""
        existing = self._load(aggregate.run.saga_id)
        if existing.run.saga != aggregate.run.saga or existing.run.input != aggregate.run.input:
            raise SagaAlreadyStarted(
                f"saga id {short(aggregate.run.saga_id)} was already used to start {existing.run.saga} with other input"
            ) from None

    def start_many(
        self,
        saga: SagaRef,
        inputs: Iterable[BaseModel | dict[str, Any]],
        *,
        saga_ids: Iterable[str] | None = None,
        start_at: datetime | None = None,
    ) -> builtins.list[str]:
        """Start many sagas of one kind in one transaction; each behaves as ``start`` would.

        Every input is validated first: one bad input raises and starts nothing.
        """
        saga_class = self.registry.saga_class(saga)
        inputs = builtins.list(inputs)
        ids: builtins.list[str | None] = [None] * len(inputs) if saga_ids is None else builtins.list(saga_ids)
        if len(ids) != len(inputs):
            raise InvalidInput(f"{len(inputs)} inputs but {len(ids)} saga ids")
        given = [check_saga_id(i) for i in ids if i is not None]
        if len(set(given)) != len(given):
            raise InvalidInput("saga_ids repeat an id")
        aggregates = [
            SagaAggregate.begin(saga_class, data, i, start_at, self.settings.max_input_bytes)
            for data, i in zip(inputs, ids, strict=True)
        ]
        if not aggregates:
            return []
        try:
            with self.repository.translating("starting sagas"):
                self.repository.save(aggregates)
            metrics.SAGAS_STARTED.labels(saga_class.name).inc(len(aggregates))
        except IntegrityError:  # some were started before: settle each as start() does
            return [self.start(saga_class, a.run.input, saga_id=a.run.saga_id, start_at=start_at) for a in aggregates]
        return [a.run.saga_id for a in aggregates]

    def send(self, saga_id: str, event: str, data: BaseModel | dict[str, Any] | None = None) -> None:
        """Deliver ``event`` to a saga that waits for it, now or later in its plan.

        Raises ``UnexpectedEvent`` (writing nothing) for an event the saga does not wait for,
        one already delivered, or a saga that has finished.
        """
        if not isinstance(event, str) or not event or len(event) > 200 or not event.isprintable():
            raise InvalidInput(f"an event name is a non-empty printable string, not {short(event)}")
        payload = event_payload(data, self.settings.max_input_bytes)

        def deliver(aggregate: SagaAggregate) -> None:
            refusal = aggregate.run.refusal(event)
            if refusal is not None:
                raise UnexpectedEvent(f"saga {short(saga_id)} {refusal}")
            aggregate.deliver(event, payload, utcnow())

        self._command(saga_id, deliver)

    def cancel(self, saga_id: str, reason: str | None = None, *, compensate: bool = True) -> None:
        """Cancel a running or waiting saga: what it did is compensated, then it ends ``cancelled``.

        With ``compensate=False`` the saga ends ``cancelled`` where it stands and nothing more
        runs, not even a compensation: the way out of ``failed`` (or of a saga whose input
        makes every step fail) for an operator who has undone what was needed by hand.
        """
        reason = check_text(reason, "a reason")

        def cancel(aggregate: SagaAggregate) -> None:
            run = aggregate.run
            if not compensate:
                if run.state.terminal and run.state is not SagaState.FAILED:
                    raise InvalidTransition(f"saga {short(saga_id)} is {run.state.value}: there is nothing to end")
                aggregate.terminate(reason, utcnow())
                return
            if run.state.terminal:
                raise InvalidTransition(f"saga {short(saga_id)} is {run.state.value}: there is nothing to cancel")
            if run.cancel_requested:
                return
            if run.compensating:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is already compensating after a failure"
                    " (cancel with compensate=False to stop it where it stands)"
                )
            aggregate.cancel(reason, utcnow())

        self._command(saga_id, cancel)

    def retry(self, saga_id: str) -> None:
        """Resume a ``failed`` saga: its failed compensation runs again, then the rest of the undo."""

        def retry(aggregate: SagaAggregate) -> None:
            if aggregate.run.state is not SagaState.FAILED:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is {aggregate.run.state.value}: only a failed saga can be retried"
                )
            aggregate.retry(utcnow())

        self._command(saga_id, retry)

    async def send_async(self, saga_id: str, event: str, data: BaseModel | dict[str, Any] | None = None) -> None:
        """``send`` for a coroutine: it runs in a worker thread (it reads the saga first), its write
        grouped with this process's other commands."""
        await asyncio.to_thread(self.send, saga_id, event, data)

    async def cancel_async(self, saga_id: str, reason: str | None = None, *, compensate: bool = True) -> None:
        """``cancel`` for a coroutine, as ``send_async``."""
        await asyncio.to_thread(lambda: self.cancel(saga_id, reason, compensate=compensate))

    async def retry_async(self, saga_id: str) -> None:
        """``retry`` for a coroutine, as ``send_async``."""
        await asyncio.to_thread(self.retry, saga_id)

    def resolve_compensation(self, saga_id: str, step: str, reason: str | None = None) -> None:
        """Mark the failed compensation of ``step`` as done by hand: the rest of the undo runs.

        For a ``failed`` saga whose compensation cannot succeed (the booking was cancelled by
        phone, say); ``retry`` is the way when the compensation itself can now succeed.
        """
        reason = check_text(reason, "a reason")

        def resolve(aggregate: SagaAggregate) -> None:
            run = aggregate.run
            failed = [node.plan.name for node in run.nodes if node.compensation_failed]
            if run.state is not SagaState.FAILED or step not in failed:
                raise InvalidTransition(
                    f"saga {short(saga_id)} is {run.state.value}; only a failed compensation can be resolved"
                    + (f" (failed: {', '.join(failed)})" if failed else "")
                )
            aggregate.resolve(step, reason, utcnow())

        self._command(saga_id, resolve)

    def _command(self, saga_id: str, command: Callable[[SagaAggregate], None]) -> None:
        uuid = aggregate_id(check_saga_id(saga_id))
        try:
            with self.repository.translating("recording a command"):
                self.repository.update(uuid, command, outages=COMMAND_OUTAGES, group=True)
        except SagaNotFound:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None

    def _load(self, saga_id: str) -> SagaAggregate:
        try:
            with self.repository.translating("loading a saga"):
                return self.repository.load(aggregate_id(saga_id))
        except SagaNotFound:
            raise SagaNotFound(f"no saga with id {short(saga_id)}") from None
