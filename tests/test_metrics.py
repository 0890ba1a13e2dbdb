"""Prometheus metrics: sagas started and finished, attempts by outcome, retries, durations, claims, and the
projection lag, from the API process and from a worker's own metrics port."""

from __future__ import annotations

import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from orchestrator import NonRetryable, Orchestrator, RetryPolicy, Saga, step
from orchestrator import metrics as m
from tests.conftest import drain


class Job(BaseModel):
    fail: bool = False


class Metered(Saga[Job]):
    @step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.01))
    def work(self, job: Job) -> None:
        if job.fail:
            raise RuntimeError("flaky")

    @step
    def last(self, job: Job) -> None:
        raise NonRetryable("no")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_follow_what_workers_record(tmp_path: object, database_url: str) -> None:
    """Starting and running sagas moves the started, finished, attempt, retry, duration and claim metrics."""
    with Orchestrator(sagas=[Metered], database=database_url) as orch:
        before, _ = m.exposition(orch)
        ids = [orch.start(Metered, {"fail": False}), orch.start(Metered, {"fail": True})]
        drain(orch, *ids)
        after, content_type = m.exposition(orch)
    text, old = after.decode(), before.decode()
    assert content_type.startswith("text/plain")

    def grew(name: str, by: float, **labels: str) -> None:
        assert value(text, name, **labels) - value(old, name, **labels) == by, (name, labels)

    grew("sagaworks_sagas_started_total", 2, saga="Metered")
    grew("sagaworks_sagas_finished_total", 2, saga="Metered", state="compensated")
    grew("sagaworks_attempts_total", 1, saga="Metered", step="work", kind="step", outcome="succeeded")
    grew("sagaworks_attempts_total", 1, saga="Metered", step="work", kind="step", outcome="retrying")
    grew("sagaworks_attempts_total", 1, saga="Metered", step="work", kind="step", outcome="failed")
    grew("sagaworks_attempts_total", 1, saga="Metered", step="last", kind="step", outcome="failed")
    grew("sagaworks_retries_total", 1, saga="Metered", step="work", kind="step")
    grew("sagaworks_attempt_duration_seconds_count", 3, saga="Metered", step="work", kind="step")
    grew("sagaworks_saga_duration_seconds_count", 2, saga="Metered", state="compensated")
    assert value(text, "sagaworks_claims_total") > value(old, "sagaworks_claims_total")
    assert value(text, "sagaworks_projection_lag_events", projection="notifications") >= 0
    assert "sagaworks_projection_lag_seconds" in text


def test_a_worker_serves_its_metrics_on_a_port(tmp_path: object) -> None:
    """metrics.serve() (what `saga worker --metrics-port` runs) answers Prometheus scrapes over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Orchestrator(sagas=[Metered], database="memory://") as orch:
        stop = m.serve(orch, port)
        try:
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        finally:
            stop()
    assert scraped.status_code == 200
    assert "sagaworks_attempts_total" in scraped.text
    assert 'sagaworks_projection_lag_events{projection="notifications"}' in scraped.text
