"""Throughput guards: how many sagas of a kind run at once, and how fast they start.

A saga class (or one of its triggers) sets ``limits = Limits(max_running=10, per=lambda claim:
claim.employee, starts_per_second=50)``. Its sagas start ``pending`` and *queued*: recorded, but
not run. Every worker's admission pass lets the queue's oldest sagas in while there are free slots
and start tokens (a saga admitted gets a ``SagaAdmitted`` event and its first step becomes due);
the others wait, in order, with the reason in their status. A slot frees when its saga ends.

Admissions are exact across any number of workers (``orchestrator.admission``): the pass saves
its ``SagaAdmitted`` events with the ``AdmissionCheck`` here, which the recorder runs inside the
same transaction after the write lock (PostgreSQL's lock on the events table, SQLite's write lock).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from eventsourcing.persistence import IntegrityError

from orchestrator.errors import DefinitionError

if TYPE_CHECKING:
    pass

BUCKETS = "limits"
"""The projection rows holding each pool's start-rate bucket (``{"tokens", "at"}``)."""


@dataclass(frozen=True)
class Limits:
    """How many sagas of a pool may run at once and how fast they may start.

    ``max_running`` counts admitted sagas that have not ended (running, waiting for an event or a
    timer, compensating); with ``per`` (a function of the saga's input model) it counts per key,
    and ``max_total`` caps all keys together. ``starts_per_second`` admits at most that many per
    second (with a burst of one second's worth).
    """

    max_running: int | None = None
    per: Callable[[Any], Any] | None = None
    max_total: int | None = None
    starts_per_second: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_running", "max_total"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DefinitionError(f"Limits({name}=...) is a whole number of at least 1, not {value!r}")
        rate = self.starts_per_second
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0
        ):
            raise DefinitionError(f"Limits(starts_per_second=...) is a positive number, not {rate!r}")
        if self.per is not None and not callable(self.per):
            raise DefinitionError(f"Limits(per=...) is a function of the saga's input, not {self.per!r}")
        if self.per is not None and self.max_running is None:
            raise DefinitionError("Limits(per=...) needs max_running: how many run at once per key")
        if self.max_total is not None and self.per is None:
            raise DefinitionError("Limits(max_total=...) is for limits per key; without per=, use max_running")
        if self.max_running is None and self.starts_per_second is None:
            raise DefinitionError("Limits needs max_running, starts_per_second or both")

    @property
    def per_key(self) -> int | None:
        """At most this many admitted per key (``None``: no limit per key)."""
        return self.max_running if self.per is not None else None

    @property
    def overall(self) -> int | None:
        """At most this many admitted over all keys (``None``: no overall limit)."""
        return self.max_total if self.per is not None else self.max_running

    def key(self, model: Any) -> str:
        """The pool key of a saga with this input (``""`` without ``per``)."""
        return "" if self.per is None else str(self.per(model))[:200]

    def reason(self, key: str) -> str:
        """Why a queued saga waits, as its status says."""
        parts = []
        if self.per_key is not None:
            parts.append(f"at most {self.per_key} running for {key!r}")
        if self.overall is not None:
            parts.append(f"at most {self.overall} running")
        if self.starts_per_second is not None:
            parts.append(f"at most {self.starts_per_second:g} starts/s")
        return "waiting for a slot: " + ", ".join(parts)


@dataclass(frozen=True)
class AdmissionCheck:
    """What the save of an admission must still find true inside its transaction."""

    pool: str
    per_key: int | None
    overall: int | None
    bucket: bytes | None
    """The rate bucket the pass planned from (``None``: there was none); another one means a race."""


class PoolFull(IntegrityError):
    """An admission lost a race: the pool is fuller (or its bucket emptier) than the pass planned."""


def check_admission(check: AdmissionCheck, running: dict[str, int], bucket: bytes | None) -> None:
    """Raise ``PoolFull`` if ``running`` (admitted per key, this save included) or the current bucket
    say the admission must not happen."""
    if _parsed(bucket) != _parsed(check.bucket):
        raise PoolFull(f"the start-rate bucket of {check.pool} changed meanwhile")
    if check.per_key is not None and any(count > check.per_key for count in running.values()):
        raise PoolFull(f"a key of {check.pool} would have more than {check.per_key} running")
    if check.overall is not None and sum(running.values()) > check.overall:
        raise PoolFull(f"{check.pool} would have more than {check.overall} running")


def _parsed(doc: bytes | None) -> Any:
    return None if doc is None else orjson.loads(doc)
