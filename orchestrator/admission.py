"""The admission pass every worker runs: queued sagas are let in as their pools' limits allow.

It plans from a read of the pool (admitted sagas per key, the queue's oldest, the start-rate
bucket), then saves the chosen sagas' ``SagaAdmitted`` events with an ``AdmissionCheck`` that the
recorder runs inside the same transaction, after the write lock: if another pass got in first the
save is refused whole, and the next pass plans again from what is now true.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson
import structlog
from eventsourcing.persistence import IntegrityError

from orchestrator.limits import BUCKETS, AdmissionCheck, Limits
from orchestrator.readmodels.status import index_entry

if TYPE_CHECKING:
    from orchestrator.definition import Saga
    from orchestrator.registry import Registry
    from orchestrator.repository import Repository

PLAN = 500
"""Queued sagas one admission pass considers at most, per pool (full keys and later starts left out)."""
ORPHAN_CHECK = 5.0
"""Seconds between looks for queues of pools the code no longer defines."""
NO_LIMIT = Limits(max_running=2**31 - 1)
log = structlog.get_logger("sagaworks.limits")


def pools(registry: Registry) -> dict[str, tuple[type[Saga[Any]], Limits]]:
    """Every pool the registered sagas and their triggers define: name -> (saga, limits)."""
    found: dict[str, tuple[type[Saga[Any]], Limits]] = {}
    for saga in registry:
        if saga.limits is not None:
            found[saga.name] = (saga, saga.limits)
        for trigger in saga.triggers:
            if trigger.limits is not None:
                found[trigger.named(saga.name)] = (saga, trigger.limits)
    return found


class Admission:
    """The side task every worker runs: let queued sagas in as their pools' limits allow."""

    name = "admission"
    on_wake = True
    """New events may be queued starts or ended sagas (a slot freed): look soon."""

    def __init__(self, registry: Registry, repository: Repository, clock: Callable[[], datetime]) -> None:
        self.registry = registry
        self.repository = repository
        self.clock = clock
        self.orphans_at = 0.0

    def run(self) -> float | None:
        found = pools(self.registry)
        wait = 0.5 if found else 5.0
        for pool, (_, limits) in found.items():
            admitted, waiting = self.admit(pool, limits)
            if waiting:
                retry = 1 / limits.starts_per_second if limits.starts_per_second and not admitted else 0.05
                wait = min(wait, retry)
        now = time.monotonic()
        if now >= self.orphans_at:  # queues of pools the code no longer defines: let them all in
            self.orphans_at = now + ORPHAN_CHECK
            for pool in self.repository.index.pool_queued():
                if pool not in found:
                    log.warning("admitting sagas of a pool no limits define any more", pool=pool)
                    self.admit(pool, NO_LIMIT)
        return wait

    def admit(self, pool: str, limits: Limits) -> tuple[int, bool]:
        """One admission pass over ``pool``: how many it let in, and whether any saga still waits."""
        index = self.repository.index
        now = self.clock()
        running = index.pool_running(pool)
        full = [key for key, count in running.items() if limits.per_key is not None and count >= limits.per_key]
        stored = index.read_rows(BUCKETS, [pool]).get(pool)
        tokens, bucket = self._tokens(limits, stored, now)
        room = math.inf if limits.overall is None else limits.overall - sum(running.values())
        if min(room, tokens) <= 0:
            return 0, bool(index.pool_waiting(pool, 1, now, full))
        waiting = index.pool_waiting(pool, PLAN, now, full)
        if not waiting:
            return 0, False
        chosen: list[UUID] = []
        for saga_uuid, key in waiting:
            if len(chosen) >= min(room, tokens):
                break
            if limits.per_key is not None and running.get(key, 0) >= limits.per_key:
                continue
            running[key] = running.get(key, 0) + 1
            chosen.append(saga_uuid)
        if not chosen:
            return 0, True
        aggregates, _ = self.repository.load_many(chosen)
        admitted = [a for a in aggregates.values() if a.run.queued is not None]
        for aggregate in admitted:
            aggregate.admit(now)
        rows: list[tuple[str, str, bytes | None]] = []
        if bucket is not None:
            left = {"tokens": bucket - len(admitted), "at": now.isoformat()}
            rows.append((BUCKETS, pool, orjson.dumps(left)))
        check = AdmissionCheck(pool, limits.per_key, limits.overall, stored)
        events = [event for aggregate in admitted for event in aggregate.collect_events()]
        try:
            with self.repository.translating("admitting sagas"):
                self.repository.store.events.put(
                    events, index=[index_entry(a) for a in admitted], rows=rows, admission=check
                )
        except IntegrityError:
            return 0, True  # another worker admitted first (or a saga moved on): plan again
        self.repository.wake_workers()
        log.debug("admitted", pool=pool, sagas=len(admitted))
        return len(admitted), len(waiting) > len(admitted)

    @staticmethod
    def _tokens(limits: Limits, stored: bytes | None, now: datetime) -> tuple[float, float | None]:
        """Whole start tokens available now (``inf`` without a rate limit), and the exact amount the
        bucket holds (``None``: no bucket is kept), fractions included so the rate comes out right."""
        rate = limits.starts_per_second
        if rate is None:
            return math.inf, None
        capacity = max(1.0, rate)
        exact = capacity
        if stored is not None:
            doc = orjson.loads(stored)
            elapsed = max(0.0, (now - datetime.fromisoformat(doc["at"])).total_seconds())
            exact = min(capacity, doc["tokens"] + rate * elapsed)
        return math.floor(exact), exact
