"""A first end-to-end check on every backend."""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Orchestrator, Saga, SagaState, step
from tests.conftest import drain


class Order(BaseModel):
    item: str


class Ship(Saga[Order]):
    @step
    def pick(self, order: Order) -> str:
        return f"picked {order.item}"

    @step()
    def pack(self, order: Order) -> int:
        return len(self.results["pick"])


def test_saga_completes_on_every_backend(database_url: str) -> None:
    """A two-step saga completes and its results are in its status."""
    with Orchestrator(sagas=[Ship], database=database_url) as orch:
        saga_id = orch.start(Ship, {"item": "book"})
        (status,) = drain(orch, saga_id)
    assert status.state is SagaState.COMPLETED
    assert status.result == {"pick": "picked book", "pack": 11}
