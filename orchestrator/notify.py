"""Completion notifications: once a saga ends, a signed JSON POST to the URL it was started with
(``start(..., notify=URL)`` or the ``Callback-URL`` header), and a call of its class's
``on_finished(self, status)`` if it has one.

Driven by the event histories: a follower of the log queues one delivery per saga and target
with its tracking record (so no end is missed after a crash, and none is queued twice), and
workers deliver them, at least once, retrying with backoff (5 s, doubling, up to an hour; 20
attempts). Every attempt is in the saga's timeline.

Receivers check ``Sagaworks-Signature: v1=<hex>``, the HMAC-SHA256 of
``f"{Sagaworks-Timestamp}.".encode() + body`` under ``SAGA_NOTIFY_SECRET`` (``verify`` does it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import inspect
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlsplit
from uuid import uuid5

import httpx
import structlog
from eventsourcing.persistence import Tracking

from orchestrator import metrics
from orchestrator.definition import Saga, StepContext
from orchestrator.following import Change, Log
from orchestrator.readmodels.status import SagaStatus, status_document
from orchestrator.readmodels.timeline import TimelineEntry
from orchestrator.registry import Registry
from orchestrator.repository import Repository
from orchestrator.safety import clean_error
from orchestrator.storage import Delivery, SagaIndex

log = structlog.get_logger("sagaworks.notify")
MAX_ATTEMPTS = 20
TIMEOUT = 10.0
"""Seconds a receiver has to answer one POST."""
ENDS = ["SagaCompleted", "SagaCompensated", "SagaCancelled", "SagaFailed", "SagaTerminated"]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``Sagaworks-Signature`` of a body sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(secret: str, body: bytes, headers: Mapping[str, str], *, tolerance: float = 300.0) -> bool:
    """Whether a notification is genuine: its signature matches and its timestamp is recent."""
    timestamp = headers.get("sagaworks-timestamp") or headers.get("Sagaworks-Timestamp") or ""
    given = headers.get("sagaworks-signature") or headers.get("Sagaworks-Signature") or ""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(given, signature(secret, timestamp, body))


def _has_hook(registry: Registry, saga: str) -> bool:
    found = registry.sagas.get(saga)
    return found is not None and getattr(found, "on_finished", None) is not None


def retry_delay(attempts: int) -> timedelta:
    """How long after a failed attempt the next one is due: 5 s, doubling, up to an hour."""
    return timedelta(seconds=min(5.0 * 2 ** min(attempts - 1, 20), 3600.0))


class Notifier:
    """Follows the log for sagas that end and queues their notifications (a ``Follower``)."""

    name: ClassVar[str] = "notifications"
    events: ClassVar[list[str]] = ENDS

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.added = 0
        """Deliveries the last batch queued (``Notifications.queue`` resets it before each batch)."""

    def record(self, changes: list[Change], tracking: Tracking, index: SagaIndex) -> None:
        deliveries: list[Delivery] = []
        for change in changes:
            # Most sagas have no notify URL and no on_finished hook: their start says so, and the
            # whole history is folded only for those that do (it was a fifth of a busy worker's time).
            started = change.started
            if started is not None and not started.notify and not _has_hook(self.registry, started.saga):
                continue
            run = change.run
            targets = [("url", run.notify)] if run.notify else []
            if _has_hook(self.registry, run.saga):
                targets.append(("hook", f"{run.saga}.on_finished"))
            body = status_document(run)
            for kind, target in targets:
                deliveries.append(
                    Delivery(
                        delivery_id=uuid5(change.saga_uuid, f"{kind}:{target}"),
                        saga_uuid=change.saga_uuid,
                        saga_id=run.saga_id,
                        saga=run.saga,
                        kind=kind,
                        target=target,
                        body=body,
                    )
                )
        index.add_deliveries(deliveries, datetime.now(UTC), tracking)
        self.added = len(deliveries)

    def reset(self, index: SagaIndex) -> None:
        from orchestrator.following import tracking_name

        index.reset_follower(tracking_name(self.name))


class Notifications:
    """Completion notifications at work: queue those of sagas that ended, and deliver due ones
    (workers run the halves as two side tasks, ``Queueing`` and ``Deliveries``)."""

    def __init__(
        self, repository: Repository, registry: Registry, secret: str | None, worker: str = "", lease: float = 30.0
    ) -> None:
        self.lease = timedelta(seconds=lease)
        """How long a worker holds a notification it is sending before another may send it."""
        self.repository = repository
        self.registry = registry
        self.secret = secret
        self.worker = worker
        self.notifier = Notifier(registry)
        self.log = Log(repository)
        self.client: httpx.Client | None = None
        self.queued_here = threading.Event()
        """Set when this process queued deliveries that ``Deliveries`` has not looked for yet."""

    def queue(self) -> int:
        """Queue the notifications of one batch of the log; how many notifications it read."""
        self.notifier.added = 0
        queued = self.log.catch_up(self.notifier)
        if self.notifier.added:
            self.queued_here.set()
            self.repository.wake_workers()  # deliveries are due now: wake the task that sends them
        return queued

    def deliver(self, limit: int) -> int:
        """Deliver up to ``limit`` due notifications; how many were tried."""
        index = self.repository.index
        now = datetime.now(UTC)
        owner = self.worker or "deliverer"
        due = index.claim_deliveries(owner, now, now + self.lease, limit)
        for delivery in due:
            self._attempt(index, delivery, owner)
        return len(due)

    def _attempt(self, index: SagaIndex, delivery: Delivery, owner: str) -> None:
        attempt = delivery.attempts  # counted by the claim
        began = datetime.now(UTC)
        try:
            self._send(delivery, attempt)
            error = None
        except Exception as failure:
            error = clean_error(f"{type(failure).__name__}: {failure}")
        ended = datetime.now(UTC)
        entry = {
            "attempt": attempt,
            "started_at": began.isoformat(),
            "ended_at": ended.isoformat(),
            "worker": owner,
            "outcome": "succeeded" if error is None else "failed" if attempt >= MAX_ATTEMPTS else "retrying",
            "error": error,
        }
        done = dataclasses.replace(delivery, log=(*delivery.log, entry))
        due = None if error is None or attempt >= MAX_ATTEMPTS else ended + retry_delay(attempt)
        index.finish_delivery(done, owner, due_at=due, delivered_at=ended if error is None else None, error=error)
        metrics.NOTIFICATIONS.labels(delivery.kind, entry["outcome"]).inc()
        context = {"saga_id": delivery.saga_id, "saga": delivery.saga, "target": _shown(delivery), "attempt": attempt}
        if error is None:
            log.info("notification delivered", **context)
        elif due is None:
            log.error("notification failed for good", **context, error=error)
        else:
            log.warning("notification failed; retrying later", **context, error=error, retry_at=due.isoformat())

    def _send(self, delivery: Delivery, attempt: int) -> None:
        if delivery.kind == "hook":
            self._call_hook(delivery, attempt)
            return
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sagaworks",
            "Sagaworks-Delivery": str(delivery.delivery_id),
            "Sagaworks-Attempt": str(attempt),
            "Sagaworks-Timestamp": timestamp,
        }
        if self.secret:
            headers["Sagaworks-Signature"] = signature(self.secret, timestamp, delivery.body)
        if self.client is None:
            self.client = httpx.Client(timeout=TIMEOUT, follow_redirects=False)
        response = self.client.post(delivery.target, content=delivery.body, headers=headers)
        if response.status_code >= 300:
            raise RuntimeError(f"the receiver answered {response.status_code}")

    def _call_hook(self, delivery: Delivery, attempt: int) -> None:
        saga = self.registry.sagas.get(delivery.saga)
        hook = getattr(saga, "on_finished", None) if saga is not None else None
        if saga is None or hook is None:
            raise LookupError(f"{delivery.saga} is not registered here with an on_finished hook")
        status = SagaStatus.model_validate_json(delivery.body)
        instance = _instance(saga, status, attempt)
        outcome = hook(instance, status)
        if inspect.isawaitable(outcome):
            asyncio.run(_awaited(outcome))


class Queueing:
    """The side task that queues notifications as sagas end (it follows the log: a short run)."""

    name = "notifications"

    def __init__(self, notifications: Notifications) -> None:
        self.notifications = notifications

    def run(self) -> float | None:
        return 0.05 if self.notifications.queue() else 1.0


class Deliveries:
    """The side task that delivers due notifications, in a thread of its own (``own_thread``): a
    receiver that answers slowly, or a hook that hangs, delays other notifications, never a step."""

    name = "deliveries"
    own_thread = True
    on_wake = True
    """Woken when this process queued deliveries (``Notifications.queue`` wakes the workers); any
    other wake-up costs no query: due retries and others' deliveries are looked for each second."""

    def __init__(self, notifications: Notifications) -> None:
        self.notifications = notifications
        self.look_at = 0.0

    def run(self) -> float | None:
        now = time.monotonic()
        queued = self.notifications.queued_here
        if not queued.is_set() and now < self.look_at:
            return self.look_at - now
        queued.clear()
        delay = 0.05 if self.notifications.deliver(20) else 1.0
        self.look_at = now + delay
        return delay


def _instance(saga: type[Saga[Any]], status: SagaStatus, attempt: int) -> Saga[Any]:
    context = StepContext(
        saga_id=status.saga_id,
        input=None,
        results=status.result,
        received={},
        attempt=attempt,
        idempotency_key=f"{status.saga_id}:on_finished",
        log_context={"saga_id": status.saga_id, "saga": status.saga, "step": "on_finished", "attempt": attempt},
    )
    return saga._bind(context)


async def _awaited(outcome: Any) -> None:
    await outcome


def _shown(delivery: Delivery) -> str:
    """Where a notification goes, without the URL's query or user part (they may hold secrets)."""
    if delivery.kind != "url":
        return delivery.target
    parts = urlsplit(delivery.target)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def timeline_entries(deliveries: list[Delivery]) -> list[TimelineEntry]:
    """The notification attempts of a saga, as timeline entries."""
    entries = []
    for delivery in deliveries:
        for entry in delivery.log:
            started, ended = datetime.fromisoformat(entry["started_at"]), datetime.fromisoformat(entry["ended_at"])
            entries.append(
                TimelineEntry(
                    kind="notification",
                    name=_shown(delivery),
                    attempt=entry["attempt"],
                    started_at=started,
                    ended_at=ended,
                    duration_ms=round((ended - started).total_seconds() * 1000, 3),
                    worker=entry.get("worker"),
                    outcome=entry["outcome"],
                    error=entry.get("error"),
                )
            )
    return entries
