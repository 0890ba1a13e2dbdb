"""Schedules: sagas started by the clock (cron, interval or once), exactly once per tick."""

from orchestrator.errors import ScheduleNotFound
from orchestrator.schedules.service import ROWS, Scheduler
from orchestrator.schedules.spec import ScheduleSpec, build, cron, describe, every, once

__all__ = ["ROWS", "ScheduleNotFound", "ScheduleSpec", "Scheduler", "build", "cron", "describe", "every", "once"]
