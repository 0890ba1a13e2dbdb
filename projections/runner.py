"""``saga projections run``: keeps every registered projection current until stopped.

It wakes when events are written (LISTEN on PostgreSQL, ``data_version`` on SQLite), polls as a
fallback, backs off while the database is away, and says what it does: a line when it starts,
one per batch it records, one when its lag changes by much, and one when it stops. Run one
runner per database; a second one is harmless (its batches are refused) but does no good.
"""

from __future__ import annotations

import threading
import time

import structlog

from orchestrator import Orchestrator
from orchestrator.storage import is_transient

log = structlog.get_logger("sagaworks.projections")


class ProjectionRunner:
    """Runs the orchestrator's projections (and the status catch-up) until ``stop`` is set."""

    def __init__(self, orch: Orchestrator, *, poll_interval: float = 1.0) -> None:
        self.orch = orch
        self.poll_interval = poll_interval
        self.signal = threading.Event()
        self.stopping = threading.Event()
        self.recorded = 0

    def stop(self) -> None:
        """Ask the runner to stop (safe from a signal handler or another thread)."""
        self.stopping.set()
        self.signal.set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Follow the log until ``stop()`` is called (or ``stop`` is set; checked each poll interval)."""
        stop = stop or self.stopping
        index = self.orch.repository.index
        waker = index.waker(self.signal.set)
        if waker is not None:
            waker.start()
        names = sorted(self.orch.projections)
        log.info("projection runner started", projections=names, lag=self.orch.projection_lag())
        failures = 0
        try:
            while not stop.is_set():
                self.signal.clear()
                try:
                    busy = self.round()
                    failures = 0
                except Exception as error:
                    if not is_transient(error):
                        raise
                    failures += 1
                    if failures == 1:
                        log.warning("projection round failed; retrying with backoff", error=str(error))
                    stop.wait(min(self.poll_interval * 2**failures, 30.0))
                    continue
                if not busy:
                    self.signal.wait(self.poll_interval)
                if self.stopping.is_set():
                    break
        finally:
            if waker is not None:
                waker.stop()
            log.info("projection runner stopped", batches=self.recorded, lag=self.orch.projection_lag())

    def round(self) -> bool:
        """One batch for each projection that has events to process; whether any had."""
        busy = False
        for name, projection in self.orch.projections.items():
            began = time.perf_counter()
            read = self.orch.log.catch_up(projection)
            if read:
                busy = True
                self.recorded += 1
                log.info(
                    "projection batch recorded",
                    projection=name,
                    events=read,
                    ms=round((time.perf_counter() - began) * 1000, 1),
                )
        return busy
