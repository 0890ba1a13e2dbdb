"""The saga-status read model: catch-up and rebuild from the event histories.

Every save writes a saga's status row and the tracking position (the last notification
the read model includes) in the events' own transaction, so the model is exact and
``status()`` reads its own writes. This module replays the notification log into the
same rows: ``rebuild`` from the beginning, ``catch_up`` from the tracking position
(which, with inline writes, finds nothing to do unless rows were lost).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from uuid import UUID

import structlog

from orchestrator import Orchestrator
from orchestrator.following import SAGA_TOPICS as TOPICS
from orchestrator.readmodels.status import index_entry

SAGA_TOPICS = frozenset(TOPICS.values())

log = structlog.get_logger("sagaworks.projections")


@dataclass(frozen=True)
class Progress:
    """What a replay did: notifications read, sagas written, the position reached."""

    notifications: int
    sagas: int
    position: int | None


class StatusProjection:
    """Replays saga histories into the status read model, with tracking positions."""

    def __init__(self, orchestrator: Orchestrator, *, page_size: int = 500) -> None:
        self.orch = orchestrator
        self.page_size = page_size

    def rebuild(self) -> Progress:
        """Replay every history into the read model, rewriting each saga's row from its events.

        Rows are upserted in place, never emptied first, so ``status()`` keeps answering during a
        rebuild; safe while workers run, since a replayed row never replaces a newer one.
        """
        head = self.orch.store.recorder.max_notification_id() or 0
        return self._replay(0, head)

    def catch_up(self) -> Progress:
        """Replay the notifications after the tracking position, if any."""
        store = self.orch.store
        head = store.recorder.max_notification_id() or 0
        return self._replay(store.index.status_position() or 0, head)

    def run_forever(self, stop: threading.Event, poll_interval: float = 1.0) -> None:
        """Keep the read model caught up until ``stop`` is set (one instance is enough).

        Saves write the status rows themselves, so this finds work only when rows were lost;
        it says so at start, whenever it replays something, and when it stops.
        """
        log.info(
            "status projection runner started",
            position=self.orch.repository.index.status_position(),
            head=self.orch.store.recorder.max_notification_id(),
            poll_interval=poll_interval,
        )
        rounds = replayed = 0
        while not stop.is_set():
            progress = self.catch_up()
            rounds += 1
            if progress.sagas:
                replayed += progress.notifications
                log.info(
                    "status projection caught up",
                    notifications=progress.notifications,
                    sagas=progress.sagas,
                    position=progress.position,
                )
            stop.wait(poll_interval)
        log.info("status projection runner stopped", rounds=rounds, notifications_replayed=replayed)

    def _replay(self, after: int, head: int) -> Progress:
        store = self.orch.store
        notifications = sagas = 0
        position = after
        while position < head:
            scanned = store.recorder.select_notifications(position + 1, self.page_size, stop=head)
            if not scanned:
                break
            page = [n for n in scanned if n.topic in SAGA_TOPICS]  # not domain events, schedules, ...
            ids: dict[UUID, None] = dict.fromkeys(UUID(str(n.originator_id)) for n in page)
            aggregates, broken = self.orch.repository.load_many(list(ids))
            for uuid, (_, problem) in broken.items():  # its row keeps what it was; workers set it aside
                log.error("saga skipped by the status projection", saga_uuid=str(uuid), problem=problem)
            entries = [index_entry(aggregate) for aggregate in aggregates.values()]
            position = scanned[-1].id
            store.index.write_status(entries, position)
            notifications += len(scanned)
            sagas += len(entries)
        return Progress(notifications, sagas, position if notifications else store.index.status_position())
