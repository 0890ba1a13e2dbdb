"""The app of the limits race test: ``saga worker --app tests.limits_app:app``."""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

from pydantic import BaseModel

from orchestrator import Limits, Orchestrator, Saga, step


class Numbered(BaseModel):
    n: int


class Logged(Saga[Numbered]):
    """At most two at a time; each step writes when it starts and ends to LIMITS_LOG."""

    limits: ClassVar[Any] = Limits(max_running=2)

    @step
    def work(self, job: Numbered) -> int:
        self._write("start")
        time.sleep(0.1)
        self._write("end")
        return job.n

    @staticmethod
    def _write(kind: str) -> None:
        with open(os.environ["LIMITS_LOG"], "a") as log:
            log.write(f"{kind} {time.time():.6f} {os.getpid()}\n")


def app() -> Orchestrator:
    """The limited saga on the database named by SAGA_DATABASE_URL (a worker's start is logged too)."""
    if os.environ.get("LIMITS_LOG"):
        Logged._write("ready")
    return Orchestrator(sagas=[Logged])
