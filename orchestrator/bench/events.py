"""The ``events`` workload: sagas started by domain events through a trigger, against the same
sagas started directly, in one run on one database with the same workers running.

Both phases start ``BenchTriggered`` sagas one call at a time from one thread, as an application
would: ``orch.start()`` N times, then (once the workers have finished those) ``orch.emit()`` N
times while the workers' trigger processors start a saga for each. A phase's rate is N over the
time from its first call until its N-th saga exists; the trigger lag is, for a sample of events,
how long after its event was recorded its saga was started (both timestamps from the store).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator import Orchestrator
from orchestrator.bench.phases import Say, percentile
from orchestrator.bench.workers import Workers
from orchestrator.bench.workloads import BenchEvent, BenchTriggered

LAG_SAMPLES = 500
"""Events whose trigger lag is measured (spread evenly over the run)."""
TRIGGER = "BenchTriggered.on.BenchEvent"


def run_events(orch: Orchestrator, count: int, workers: Callable[[], Workers], say: Say) -> dict[str, Any]:
    """Both phases with the workers ``workers()`` starts; the figures of the JSON line."""
    running = workers()
    try:
        began = time.perf_counter()
        for n in range(count):
            orch.start(BenchTriggered, {"n": n}, saga_id=f"direct-{n}")
        direct_s = time.perf_counter() - began
        _wait_for(orch, count, "completed", 600)  # the direct sagas run first: the workers are idle again
        say(f"  direct: {count / direct_s:.0f} sagas/s started with orch.start(), one at a time")
        began = time.perf_counter()
        for n in range(count):
            orch.emit(BenchEvent(n=n), event_id=f"ev-{n}")
        emit_s = time.perf_counter() - began
        _wait_for(orch, 2 * count, None, 600)
        events_s = time.perf_counter() - began
        lags = _lags(orch, count)
    finally:
        closing = running.stop()
    figures = {
        "finished": count,
        "direct_starts_per_s": count / direct_s,
        "emits_per_s": count / emit_s,
        "event_starts_per_s": count / events_s,
        "events_vs_direct": direct_s / events_s,
        "trigger_lag_p50_ms": percentile(lags, 50),
        "trigger_lag_p99_ms": percentile(lags, 99),
        "peak_rss_mb": max(f["peak_rss_mb"] for f in closing) if closing else None,
    }
    say(
        f"  events: {figures['event_starts_per_s']:.0f} sagas/s started by events"
        f" ({figures['events_vs_direct']:.2f} of direct), trigger lag p50 {figures['trigger_lag_p50_ms']:.0f} ms,"
        f" p99 {figures['trigger_lag_p99_ms']:.0f} ms"
    )
    return figures


def _wait_for(orch: Orchestrator, total: int, state: str | None, timeout: float) -> None:
    """Until ``total`` BenchTriggered sagas exist (in ``state``, if given)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = orch.counts(state=state, saga=BenchTriggered).get(BenchTriggered.name, {})
        if sum(counts.values()) >= total:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(counts.values())} of {total} BenchTriggered sagas after {timeout} s")
        time.sleep(0.01)


def _lags(orch: Orchestrator, count: int) -> list[float]:
    """Event recorded -> its saga started, in ms, for up to ``LAG_SAMPLES`` events spread over the run."""
    step = max(1, count // LAG_SAMPLES)
    recorded = {}
    after = 0
    while page := orch.events(BenchEvent.event_name, after=after, limit=1000):
        recorded.update({info.event_id: info.timestamp for info in page})
        after = page[-1].position
    lags = []
    for n in range(0, count, step):
        status = orch.status(f"{TRIGGER}:ev-{n}")
        lags.append((status.created_at - recorded[f"ev-{n}"]).total_seconds() * 1000)
    return lags
