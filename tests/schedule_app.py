"""The app of the schedule race test: ``saga worker --app tests.schedule_app:app`` on a fast clock.

Every process maps real time to the same schedule time (``SCHEDULE_CLOCK`` = "origin speed": an ISO
moment and how many schedule seconds pass per real second, counted from ``SCHEDULE_REAL_ORIGIN``),
so two workers race for the same ticks exactly as they would on the wall clock, only faster.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pydantic import BaseModel

from orchestrator import Orchestrator, Saga, cron, step


class Tick(BaseModel):
    report: str = "quarter-hourly"


class Report(Saga[Tick]):
    """Every 10 minutes of Berlin time, through the night clocks go back an hour."""

    schedules: ClassVar[list[Any]] = [cron("*/10 * * * *", tz="Europe/Berlin", catch_up="all", name="report")]

    @step
    def build(self, tick: Tick) -> str:
        return tick.report


def fast_clock() -> datetime:
    """Schedule time: ``origin`` plus real seconds since ``SCHEDULE_REAL_ORIGIN`` times ``speed``."""
    origin, speed = os.environ["SCHEDULE_CLOCK"].split()
    elapsed = time.time() - float(os.environ["SCHEDULE_REAL_ORIGIN"])
    return datetime.fromisoformat(origin) + timedelta(seconds=elapsed * float(speed))


def app() -> Orchestrator:
    """The scheduled saga on SAGA_DATABASE_URL, its scheduler on the fast clock."""
    orch = Orchestrator(sagas=[Report])
    orch.scheduler.clock = fast_clock
    orch.scheduler.max_wait = 0.02
    return orch
