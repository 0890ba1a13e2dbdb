"""What a worker logs about the sagas it records: one line per failure, by how bad it is, and one
info line per saga that ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator import events as ev
from orchestrator import metrics
from orchestrator.aggregate import SagaAggregate

if TYPE_CHECKING:
    from orchestrator.worker.attempts import Running

TERMINAL_LINES: dict[type[Any], str] = {
    ev.SagaCompleted: "saga completed",
    ev.SagaCompensated: "saga compensated",
    ev.SagaCancelled: "saga cancelled",
}


def log_recorded(log: Any, aggregate: SagaAggregate, events: list[Any], running: Running | None) -> None:
    """Log what was just recorded for a saga: a retried attempt at warning, a failure for good at
    error (with the traceback of an unexpected exception), and the saga's end."""
    run = aggregate.run
    context = {"saga_id": run.saga_id, "saga": run.saga}
    for event in events:
        count(run.saga, event)
        if isinstance(event, ev.StepAttemptFailed | ev.CompensationAttemptFailed):
            kind = "step" if isinstance(event, ev.StepAttemptFailed) else "compensation"
            log.warning(
                f"{kind} attempt failed; retrying later",
                **context,
                step=event.name,
                attempt=event.attempt,
                error=event.error,
                retry_at=event.retry_at.isoformat(),
            )
        elif isinstance(event, ev.StepFailed | ev.CompensationFailed):
            kind = "step" if isinstance(event, ev.StepFailed) else "compensation"
            exception = running.outcome.exception if running and running.outcome else None
            log.error(
                f"{kind} failed for good",
                **context,
                step=event.name,
                attempt=event.attempt,
                error=event.error,
                exc_info=exception,
                **({"traceback": event.traceback} if event.traceback and exception is None else {}),
            )
        elif isinstance(event, ev.SagaFailed):
            log.error("saga failed", **context, error=event.error)
        elif type(event) in TERMINAL_LINES:
            log.info(TERMINAL_LINES[type(event)], **context, **({"error": run.error} if run.error else {}))
        if isinstance(event, ev.SagaCompleted | ev.SagaCompensated | ev.SagaCancelled | ev.SagaFailed):
            state = run.state.value
            metrics.SAGAS_FINISHED.labels(run.saga, state).inc()
            metrics.SAGA_SECONDS.labels(run.saga, state).observe((run.updated_at - run.created_at).total_seconds())


def count(saga: str, event: Any) -> None:
    """Count a recorded attempt outcome in the metrics."""
    if isinstance(event, ev.StepSucceeded | ev.CompensationSucceeded):
        kind = "step" if isinstance(event, ev.StepSucceeded) else "compensation"
        metrics.ATTEMPTS.labels(saga, event.name, kind, "succeeded").inc()
    elif isinstance(event, ev.AttemptFailed):
        kind = "step" if isinstance(event, ev.StepAttemptFailed | ev.StepFailed) else "compensation"
        lost = "lease expired" in event.error
        outcome = "lost" if lost else "retrying" if isinstance(event, ev.Retrying) else "failed"
        metrics.ATTEMPTS.labels(saga, event.name, kind, outcome).inc()
        if isinstance(event, ev.Retrying):
            metrics.RETRIES.labels(saga, event.name, kind).inc()
