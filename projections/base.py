"""Read models users write: a fold of saga events into JSON rows, kept exactly once from the log.

```python
class ApprovedTotals(Projection):
    name = "approved_totals"
    events = ["SagaCompleted"]          # the event types it follows
    sagas = ["ExpenseClaim"]            # and only these sagas' events

    def apply(self, change: Change, rows: Rows) -> None:
        rows.add(change.input["employee"], "total", float(change.input["amount"]))
```

Register it with ``Orchestrator(sagas=[...], projections=[ApprovedTotals()])``; ``saga projections
run`` keeps it current (each batch of events and its tracking record commit together, so a
crash repeats nothing), ``saga projections rebuild`` replays it from scratch, and
``orch.projection("approved_totals")`` reads its rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson
from eventsourcing.persistence import Tracking

from orchestrator import DefinitionError
from orchestrator.following import TOPICS, Change
from orchestrator.storage import SagaIndex

_DELETED = None


class Rows:
    """A projection's rows while a batch is applied: read through, written at the end with the tracking record."""

    def __init__(self, index: SagaIndex, projection: str) -> None:
        self.index = index
        self.projection = projection
        self.pending: dict[str, dict[str, Any] | None] = {}
        """Rows this batch wrote (``None``: deleted)."""
        self.read: dict[str, dict[str, Any] | None] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        """The row stored under ``key`` (as this batch has left it), or ``None``."""
        if key in self.pending:
            row = self.pending[key]
        else:
            if key not in self.read:
                stored = self.index.read_rows(self.projection, [key]).get(key)
                self.read[key] = None if stored is None else orjson.loads(stored)
            row = self.read[key]
        return None if row is None else dict(row)

    def put(self, key: str, row: dict[str, Any]) -> None:
        """Store ``row`` under ``key``, replacing what was there."""
        self.pending[_key(key)] = dict(row)

    def add(self, key: str, field: str, amount: float) -> dict[str, Any]:
        """Add ``amount`` to the number ``field`` of the row ``key`` (a new row or field starts at 0)."""
        row = self.get(key) or {}
        row[field] = row.get(field, 0) + amount
        self.put(key, row)
        return row

    def delete(self, key: str) -> None:
        """Remove the row ``key``."""
        self.pending[_key(key)] = _DELETED

    def encoded(self) -> dict[str, bytes | None]:
        """What to write: each touched key's row as JSON, ``None`` to delete."""
        return {key: None if row is None else orjson.dumps(row) for key, row in self.pending.items()}


class Projection(ABC):
    """Base of the read models users write; subclasses set ``name`` and write ``apply``."""

    name: ClassVar[str]
    """Unique among projections: its rows and its position are kept under it."""
    events: ClassVar[Sequence[str]] = ()
    """Event types it follows (``SagaStarted``, ``StepSucceeded``, ``SagaCompleted``, ...); empty: all."""
    sagas: ClassVar[Sequence[str]] = ()
    """Only events of these sagas reach ``apply``; empty: every saga's."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name.replace("_", "").isalnum() or len(name) > 60:
            raise DefinitionError(f"{cls.__qualname__}.name must be letters, digits and _, not {name!r}")
        unknown = [event for event in cls.events if event not in TOPICS]
        if unknown:
            raise DefinitionError(f"{cls.__qualname__} follows unknown event types: {', '.join(unknown)}")

    @abstractmethod
    def apply(self, change: Change, rows: Rows) -> None:
        """Fold one event into the rows (deterministic: a rebuild must give the same rows)."""

    def record(self, changes: list[Change], tracking: Tracking, index: SagaIndex) -> None:
        """Apply a batch and write its rows with the tracking record, in one transaction."""
        rows = Rows(index, self.name)
        for change in changes:
            if not self.sagas or change.saga in self.sagas:
                self.apply(change, rows)
        index.write_rows(self.name, rows.encoded(), tracking)

    def reset(self, index: SagaIndex) -> None:
        """Drop the rows and the position (for a rebuild)."""
        from orchestrator.following import tracking_name

        index.reset_follower(tracking_name(self.name), self.name)


def _key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 500 or "\x00" in key:
        raise ValueError(f"a projection row key is a string of 1 to 500 characters, not {key!r}")
    return key
