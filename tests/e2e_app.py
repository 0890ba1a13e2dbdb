"""The app of the end-to-end tests: ``saga serve --app tests.e2e_app:app`` and ``saga worker --app ...``."""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Orchestrator, Saga, step


class Parcel(BaseModel):
    item: str
    weight: int = 1


class Deliver(Saga[Parcel]):
    @step
    def pick(self, parcel: Parcel) -> str:
        return f"picked {parcel.item}"

    @step
    def post(self, parcel: Parcel) -> int:
        return parcel.weight * 2


def app() -> Orchestrator:
    """The end-to-end saga on the database named by SAGA_DATABASE_URL."""
    return Orchestrator(sagas=[Deliver])
