"""Prometheus metrics (prometheus-client): what the engine counts and times, per process.

``saga serve`` exposes them at ``/metrics``; a worker started with ``--metrics-port`` serves them
itself. Counters are per process (Prometheus sums them across processes); the projection lag is
read from the database at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from orchestrator.client import Orchestrator

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)

SAGAS_STARTED = Counter(
    "sagaworks_sagas_started_total", "Sagas started (repeats of an idempotent start not counted).", ["saga"]
)
SAGAS_FINISHED = Counter("sagaworks_sagas_finished_total", "Sagas that reached a terminal state.", ["saga", "state"])
ATTEMPTS = Counter(
    "sagaworks_attempts_total",
    "Attempts of steps and compensations by outcome: succeeded, retrying, failed (for good), lost.",
    ["saga", "step", "kind", "outcome"],
)
RETRIES = Counter(
    "sagaworks_retries_total", "Attempts that failed and were scheduled to run again.", ["saga", "step", "kind"]
)
ATTEMPT_SECONDS = Histogram(
    "sagaworks_attempt_duration_seconds",
    "How long attempts ran, in this worker.",
    ["saga", "step", "kind"],
    buckets=BUCKETS,
)
SAGA_SECONDS = Histogram(
    "sagaworks_saga_duration_seconds", "From start to terminal state.", ["saga", "state"], buckets=BUCKETS
)
CLAIMS = Counter("sagaworks_claims_total", "Claim queries a worker ran.")
CLAIMED = Counter("sagaworks_claimed_sagas_total", "Sagas leased by claims.")
CONFLICTS = Counter("sagaworks_conflicts_total", "Saves that met newer events and were redone saga by saga.")
NOTIFICATIONS = Counter(
    "sagaworks_notifications_total", "Notification delivery attempts by outcome.", ["kind", "outcome"]
)


class LagCollector(Collector):
    """The projections' (and the notification queue's) lag, read when Prometheus scrapes."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch

    def collect(self) -> Iterator[Metric]:
        events = GaugeMetricFamily(
            "sagaworks_projection_lag_events", "Events a follower of the log has not processed.", labels=["projection"]
        )
        seconds = GaugeMetricFamily(
            "sagaworks_projection_lag_seconds", "Age of the oldest event it has not processed.", labels=["projection"]
        )
        try:
            lags = self.orch.projection_lag()
        except Exception:  # the database is away: no lag figures rather than a failed scrape
            lags = {}
        for name, lag in lags.items():
            events.add_metric([name], lag["lag_events"])
            seconds.add_metric([name], lag["lag_seconds"])
        yield events
        yield seconds


def exposition(orch: Orchestrator) -> tuple[bytes, str]:
    """This process's metrics and ``orch``'s projection lag, in the text exposition format."""
    lag = CollectorRegistry()
    lag.register(LagCollector(orch))
    return generate_latest(REGISTRY) + generate_latest(lag), CONTENT_TYPE_LATEST


def serve(orch: Orchestrator, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve this process's metrics (and ``orch``'s lag) on ``host:port`` in a background thread;
    returns what stops it."""
    from prometheus_client import start_http_server

    collector = LagCollector(orch)
    REGISTRY.register(collector)
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        REGISTRY.unregister(collector)

    return stop
