"""Lease renewal: a worker extends the claims of attempts that run long, many sagas per save."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from eventsourcing.persistence import IntegrityError

from orchestrator.aggregate import SagaAggregate, Work
from orchestrator.repository import Repository
from orchestrator.storage import is_transient
from orchestrator.worker.attempts import Attempts, Running
from orchestrator.worker.batch import Bookkeeper, Job, utcnow
from orchestrator.worker.state import WorkerState


class Leases:
    """Renews the lease of every attempt in flight a third of a lease before it would lapse."""

    def __init__(self, books: Bookkeeper) -> None:
        self.books = books
        self.state: WorkerState = books.state
        self.repository: Repository = books.repository
        self.attempts: Attempts = books.attempts

    def renew(self) -> None:
        """Record ``LeaseRenewed`` for the attempts whose renewal is due, in one save."""
        now = time.monotonic()
        due = [(uuid, r) for uuid, r in self.attempts.running.items() if now >= r.renew_at]
        if not due:
            return
        lease_until = utcnow() + timedelta(seconds=self.state.lease)
        stale = [uuid for uuid, running in due if running.stale]
        loaded, broken = self.repository.load_many(stale)
        changed = []
        for uuid, running in due:
            running.renew_at = now + self.state.lease / 3
            if uuid in broken:
                self.books.set_aside(uuid, *broken[uuid])
                continue
            if running.stale:
                running.aggregate, running.stale = loaded[uuid], False
            if running.aggregate.renew(running.work, lease_until, utcnow()):
                changed.append(running)
        if not changed:
            return
        try:
            self.state.stats["saves"] += 1
            self.repository.save([r.aggregate for r in changed], wake=False)
        except Exception as error:
            for running in changed:
                running.stale = True  # the failed save changed them in memory only
            if not isinstance(error, IntegrityError) and is_transient(error):
                raise
            for running in changed:
                self._renew_one(running, lease_until)

    def _renew_one(self, running: Running, lease_until: datetime) -> None:
        def renew(aggregate: SagaAggregate) -> Work | None:
            aggregate.renew(running.work, lease_until, utcnow())
            return None

        redone = self.books.commit_one(running.work.saga_uuid, Job(None, renew))
        if redone is not None:
            running.aggregate, running.stale = redone[0], False
