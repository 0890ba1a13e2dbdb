"""Listing sagas: the filters a caller may give, the opaque cursor of keyset paging, and a page."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict

from orchestrator.errors import InvalidInput
from orchestrator.readmodels.status import SagaStatus
from orchestrator.safety import short, unstorable
from orchestrator.states import SagaState
from orchestrator.storage import StatusQuery

MAX_PAGE = 1000
"""The largest page one call returns."""
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class SagaPage(BaseModel):
    """One page of a listing: its sagas, and the cursor of the next page (``None``: this was the last)."""

    model_config = ConfigDict(frozen=True)

    items: list[SagaStatus]
    next_cursor: str | None = None


@dataclass(frozen=True)
class Filters:
    """The filters of ``list``, ``page`` and ``counts``, as a caller gives them."""

    state: SagaState | str | None = None
    saga: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    search: dict[str, Any] | None = None

    def query(self, cursor: str | None = None) -> StatusQuery:
        """The storage query, after checking every filter (``InvalidInput`` naming a bad one)."""
        state = None
        if self.state is not None:
            try:
                state = SagaState(self.state).value
            except ValueError:
                states = ", ".join(s.value for s in SagaState)
                raise InvalidInput(f"unknown state {short(self.state)}; states are {states}") from None
        times = {}
        for name in ("created_after", "created_before", "updated_after", "updated_before"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
                raise InvalidInput(f"{name} must be a timezone-aware datetime, not {short(value)}")
            times[name] = value
        search = dict(self.search or {})
        for name, value in search.items():
            if not isinstance(name, str) or not _FIELD.fullmatch(name):
                raise InvalidInput(f"a search field is a field name, not {short(name)}")
            if not (value is None or isinstance(value, str | int | float | bool)) or unstorable(value):
                raise InvalidInput(f"search value for {name!r} must be a string, number or boolean")
        return StatusQuery(state=state, saga=self.saga, search=search, after=decode_cursor(cursor), **times)


def encode_cursor(status: SagaStatus) -> str:
    """The cursor that continues a listing after ``status`` (its place in the order, opaque to callers)."""
    from orchestrator.aggregate import aggregate_id

    raw = orjson.dumps([status.updated_at.isoformat(), aggregate_id(status.saga_id).hex])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, UUID] | None:
    """The place in the order a cursor stands for; ``InvalidInput`` for one this engine did not make."""
    if cursor is None:
        return None
    try:
        at, key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        moment = datetime.fromisoformat(at)
        if moment.utcoffset() is None:
            raise ValueError("naive time")
        return moment, UUID(key)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidInput(f"not a cursor of this listing: {short(cursor)}") from None
