"""The saga of the poison tests, also run by ``saga worker --app tests.poison_app:app`` subprocesses."""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

from pydantic import BaseModel

from orchestrator import Orchestrator, RetryPolicy, Saga, step

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=0.02)


class Item(BaseModel):
    name: str = "lamp"
    weight: float = 1.0
    count: int = 1
    output: str = "ok"
    """What ``pick`` returns: ``ok``, ``nul``, ``nan``, ``huge`` or ``emit-nul``."""


calls: Counter[tuple[str, str]] = Counter()
lock = threading.Lock()


class Pick(Saga[Item]):
    @step(retry=FAST)
    def pick(self, item: Item) -> Any:
        with lock:
            calls[(self.saga_id, "pick")] += 1
        if item.output == "nul":
            return {"label": "a\x00b"}
        if item.output == "nan":
            return {"weight": math.nan}
        if item.output == "huge":
            return 2**80
        if item.output == "emit-nul":
            self.emit({"note": "x\x00"}, name="Picked")
        return {"label": item.name}

    @pick.compensate
    def unpick(self, item: Item, picked: Any) -> None:
        with lock:
            calls[(self.saga_id, "unpick")] += 1

    @step(retry=FAST)
    def pack(self, item: Item) -> str:
        with lock:
            calls[(self.saga_id, "pack")] += 1
        return "packed"

    @step(retry=FAST)
    def ship(self, item: Item) -> None:
        with lock:
            calls[(self.saga_id, "ship")] += 1


def app() -> Orchestrator:
    """The poison test saga on the database named by SAGA_DATABASE_URL."""
    return Orchestrator(sagas=[Pick])
