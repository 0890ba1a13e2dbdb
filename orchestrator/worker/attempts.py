"""The attempts in flight in one worker: starting them, and collecting their outcomes."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from orchestrator import metrics
from orchestrator.aggregate import Outcome, SagaAggregate, Work
from orchestrator.definition import Results, Saga, StepContext
from orchestrator.registry import Registry
from orchestrator.worker.execution import StepRunner, describe, serialise
from orchestrator.worker.state import WorkerState


@dataclass
class Running:
    """An attempt in flight in this worker."""

    work: Work
    aggregate: SagaAggregate
    future: Future[Outcome]
    started: float
    deadline: float | None
    renew_at: float
    outcome: Outcome | None = None
    stale: bool = False
    """A save that failed touched ``aggregate``: reload it before recording the outcome."""


class Attempts:
    """Runs the attempts a worker claimed and keeps track of them until their outcomes are recorded."""

    def __init__(
        self, state: WorkerState, registry: Registry, concurrency: int, max_bytes: int, orchestrator: Any = None
    ) -> None:
        self.state = state
        self.orchestrator = orchestrator
        self.registry = registry
        self.max_bytes = max_bytes
        self.runner = StepRunner(concurrency)
        self.running: dict[UUID, Running] = {}
        self.abandoned: dict[UUID, Future[Outcome]] = {}
        """Timed-out (or set aside) ``def`` attempts whose threads have not returned: they still hold a thread."""

    def busy(self, saga_uuid: UUID) -> bool:
        """Whether an attempt of the saga still runs here (in flight, or a thread left behind)."""
        return saga_uuid in self.running or saga_uuid in self.abandoned

    def capacity(self, concurrency: int) -> int:
        """How many more attempts fit (threads left behind by timed-out steps count as taken)."""
        self.abandoned = {uuid: f for uuid, f in self.abandoned.items() if not f.done()}
        return concurrency - len(self.running) - len(self.abandoned)

    def start(self, aggregate: SagaAggregate, work: Work) -> None:
        """Run ``work``, claimed on ``aggregate``, in the background."""
        saga = self.registry.sagas[aggregate.run.saga]
        node = saga.step_map.get(work.name)
        future: Future[Outcome]
        # The timeout of the plan the saga started with (sagas started before 0.2 recorded none).
        timeout = aggregate.run.node(work.name).plan.timeout
        try:
            if node is None:
                raise LookupError(f"{saga.name} has no step {work.name!r} any more")
            timeout = node.timeout if timeout is None else timeout
            context = self._context(saga, aggregate, work)
            instance = saga._bind(context)
            args: tuple[Any, ...]
            if work.kind == "step":
                fn, args, policy = node.fn, (instance, context.input), node.retry
            else:
                if node.compensation is None:
                    raise LookupError(f"step {work.name!r} of {saga.name} has no compensation any more")
                result = context.results.get(node.name)
                fn, args, policy = node.compensation.fn, (instance, context.input, result), node.compensation.retry
        except Exception as error:
            # The saga's stored input or results no longer fit its code: this attempt cannot run at all.
            future = Future()
            future.set_result(Outcome(error=f"the attempt cannot start: {describe(error)}", retryable=False))
            timeout = None
        else:
            max_bytes = self.max_bytes
            future = self.runner.submit(
                fn,
                args,
                context.log_context,
                lambda value: serialise(node, work, value, context, max_bytes),
                policy.gives_up,
            )
        future.add_done_callback(lambda _: self.state.signal.set())
        self.state.stats["attempts"] += 1
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        self.running[aggregate.id] = Running(work, aggregate, future, now, deadline, now + self.state.lease / 3)

    def _context(self, saga: type[Saga[Any]], aggregate: SagaAggregate, work: Work) -> StepContext:
        run = aggregate.run
        suffix = "" if work.kind == "step" else "#compensate"  # '#' is in no step name: keys never collide
        return StepContext(
            saga_id=run.saga_id,
            input=aggregate.input_model(saga),
            results=Results(saga, run.results),
            received=run.received,
            attempt=work.attempt,
            idempotency_key=f"{run.saga_id}:{work.name}{suffix}",
            log_context={
                "saga_id": run.saga_id,
                "saga": saga.name,
                "step": work.name,
                "kind": work.kind,
                "attempt": work.attempt,
                "worker": self.state.worker_id,
            },
            orchestrator=self.orchestrator,
        )

    def finished(self) -> dict[UUID, Running]:
        """The attempts that ended (or timed out) and whose outcomes are not recorded yet."""
        now = time.monotonic()
        ended: dict[UUID, Running] = {}
        for uuid, running in list(self.running.items()):
            if running.outcome is None:
                if running.future.done():
                    running.outcome = running.future.result()
                elif running.deadline is not None and now >= running.deadline:
                    if not running.future.cancel():  # an async step stops; a sync one runs on, ignored
                        self.abandoned[uuid] = running.future
                    seconds = running.deadline - running.started
                    running.outcome = Outcome(error=f"TimeoutError: attempt timed out after {seconds:g} s")
                else:
                    continue
                metrics.ATTEMPT_SECONDS.labels(
                    running.aggregate.run.saga, running.work.name, running.work.kind
                ).observe(now - running.started)
                if running.outcome.error is None:
                    self.state.log.debug(
                        "attempt succeeded",
                        saga_id=running.aggregate.run.saga_id,
                        saga=running.aggregate.run.saga,
                        step=running.work.name,
                        kind=running.work.kind,
                        attempt=running.work.attempt,
                        ms=round((now - running.started) * 1000, 1),
                    )
            ended[uuid] = running
        return ended

    def forget(self, saga_uuid: UUID) -> None:
        """Stop tracking a saga's attempt (set aside); a thread still running it keeps its slot."""
        running = self.running.pop(saga_uuid, None)
        if running is not None and not running.future.done():
            self.abandoned[saga_uuid] = running.future  # no second attempt beside it until it returns

    def next_deadline(self, now: float) -> float:
        """Seconds until the next renewal or timeout of an attempt in flight."""
        times = [r.renew_at for r in self.running.values()]
        times += [r.deadline for r in self.running.values() if r.deadline is not None]
        return max(0.0, min(times) - now) if times else float("inf")

    def close(self) -> int:
        """Stop running attempts; how many step threads still run (hung or timed-out steps)."""
        self.runner.close()
        futures = [*self.abandoned.values(), *(r.future for r in self.running.values())]
        return sum(not future.done() for future in futures)
