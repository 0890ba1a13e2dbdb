"""How saga events are stored: plain JSON of the pydantic models, under their explicit topics."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import resolve_topic
from pydantic import BaseModel


class PydanticMapper(Mapper[UUID]):
    """Stores events as plain JSON (``model_dump(mode="json")``) and validates them on the way back."""

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        state = domain_event.model_dump(mode="json", exclude={"originator_id", "originator_version"})
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=type(domain_event).topic,
            state=orjson.dumps(state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        cls: type[BaseModel] = resolve_topic(stored_event.topic)
        state = orjson.loads(stored_event.state)
        state["originator_id"] = stored_event.originator_id
        state["originator_version"] = stored_event.originator_version
        return cls.model_validate(state)
