"""The bench's measurements on one fresh database: unloaded latency, throughput under load, reads.

Latencies come from the sagas' own event timestamps (``updated_at - created_at`` of the
terminal status: ``SagaStarted`` written by the bench process, the last event by a worker),
so how often the bench polls changes when it notices the end, not what it measures.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from eventsourcing.persistence import Tracking

from orchestrator import Orchestrator, SagaState, SagaStatus, UnexpectedEvent
from orchestrator.aggregate import Outcome, SagaAggregate
from orchestrator.bench.workers import Workers
from orchestrator.bench.workloads import BENCH_SAGAS, GO, BenchOk, Workload, app
from orchestrator.following import tracking_name
from orchestrator.registry import policies_of

Say = Callable[[str], None]
T = TypeVar("T")
NOT_TERMINAL = [state for state in SagaState if not state.terminal]
WARMUP = 3
FILL_PROCESSES = 2
"""Processes that store the ``status`` workload's sagas on PostgreSQL."""
"""Unloaded samples run and dropped first: the worker's first saga pays for imports and caches."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between the nearest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(status: SagaStatus) -> float:
    """Start to last event, in milliseconds, from the saga's own event timestamps."""
    return (status.updated_at - status.created_at).total_seconds() * 1000


def chunks(count: int, size: int) -> Iterator[range]:
    """``range(count)`` in consecutive pieces of at most ``size``."""
    for first in range(0, count, size):
        yield range(first, min(first + size, count))


def max_event(orch: Orchestrator) -> int:
    """The last notification id of the events table (0 when empty)."""
    return orch.store.recorder.max_notification_id() or 0


def unloaded_latency(orch: Orchestrator, workload: Workload, samples: int, workers: Workers) -> list[float]:
    """Start one saga at a time (the worker idle meanwhile) and return each one's latency in ms."""
    latencies = []
    warmup = min(WARMUP, samples)
    for n in range(warmup + samples):
        saga_id = orch.start(workload.saga, {"n": n})
        sent = False
        deadline = time.monotonic() + 60
        while True:
            status = orch.status(saga_id)
            if status.state.terminal:
                break
            if workload.sends and not sent and status.state is SagaState.WAITING:
                orch.send(saga_id, GO)
                sent = True
            if time.monotonic() > deadline or not workers.alive():
                raise RuntimeError(f"saga {saga_id} still {status.state.value} after 60 s\n{workers.failure()}")
            time.sleep(0.001)
        if n >= warmup:
            latencies.append(latency_ms(status))
    return latencies


@dataclass
class LoadRun:
    """What the load phase saw from the bench's side."""

    statuses: list[SagaStatus]
    start_transactions: int
    sends: int
    submit_s: float
    wall_s: float


class Sender:
    """Sends ``go`` to the sagas that wait for it, a few at a time, each exactly once."""

    def __init__(self, orch: Orchestrator, threads: int = 4) -> None:
        self.orch = orch
        self.sent: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-send")

    def deliver(self) -> None:
        """Send ``go`` to every saga now listed as waiting and not sent to yet."""
        waiting = [s.saga_id for s in self.orch.list(state=SagaState.WAITING, limit=500)]
        todo = [saga_id for saga_id in waiting if saga_id not in self.sent]
        self.sent.update(todo)
        list(self.pool.map(self._send, todo))

    def _send(self, saga_id: str) -> None:
        with suppress(UnexpectedEvent):  # listed as waiting just before another delivery landed
            self.orch.send(saga_id, GO)

    def close(self) -> None:
        """Stop the sending threads."""
        self.pool.shutdown()


def run_load(
    orch: Orchestrator, workload: Workload, sagas: int, batch: int, submitters: int, workers: Workers, say: Say
) -> LoadRun:
    """Start ``sagas`` sagas from ``submitters`` threads as fast as they can (``batch`` 1: one
    ``start()`` per saga, as applications do; more: ``start_many`` of that many) and wait until
    every one is terminal."""
    sender = Sender(orch, threads=max(4, submitters)) if workload.sends else None
    commits_before = orch.repository.commits.batches
    numbers = list(range(sagas))
    shares = [numbers[k::submitters] for k in range(submitters)]
    started: list[list[str]] = [[] for _ in range(submitters)]
    calls = [0] * submitters

    def submit(k: int) -> None:
        for piece in chunks(len(shares[k]), batch):
            group = [shares[k][i] for i in piece]
            if batch == 1:
                started[k].append(orch.start(workload.saga, {"n": group[0]}))
            else:
                started[k] += orch.start_many(workload.saga, [{"n": n} for n in group])
            calls[k] += 1

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=submitters, thread_name_prefix="bench-submit") as pool:
            futures = [pool.submit(submit, k) for k in range(submitters)]
            while not all(f.done() for f in futures):
                if sender is not None:
                    sender.deliver()
                time.sleep(0.01)
            for future in futures:
                future.result()
        ids = [saga_id for share in started for saga_id in share]
        transactions = orch.repository.commits.batches - commits_before if batch == 1 else sum(calls)
        submit_s = time.perf_counter() - began
        say(f"  started {len(ids)} sagas in {submit_s:.2f} s from {submitters} threads ({transactions} transactions)")
        statuses = wait_terminal(orch, ids, workers, sender, say, timeout=60 + sagas * 0.1)
    finally:
        if sender is not None:
            sender.close()
    return LoadRun(statuses, transactions, len(sender.sent) if sender else 0, submit_s, time.perf_counter() - began)


def wait_terminal(
    orch: Orchestrator, ids: list[str], workers: Workers, sender: Sender | None, say: Say, timeout: float
) -> list[SagaStatus]:
    """Poll until no saga is in a non-terminal state, then confirm it saga by saga."""
    deadline = time.monotonic() + timeout
    first_event = max_event(orch)
    report_at = time.monotonic() + 5
    while True:
        if sender is not None:
            sender.deliver()
        if not workers.alive():
            raise RuntimeError(f"a worker died during the load phase\n{workers.failure()}")
        if not any(orch.list(state=state, limit=1) for state in NOT_TERMINAL):
            statuses = [orch.status(saga_id) for saga_id in ids]
            if all(status.state.terminal for status in statuses):
                return statuses
        now = time.monotonic()
        if now > deadline:
            states = Counter(orch.status(saga_id).state.value for saga_id in ids)
            raise RuntimeError(f"sagas not terminal after {timeout:.0f} s: {dict(states)}")
        if now > report_at:
            say(f"  ... {max_event(orch) - first_event} events recorded meanwhile")
            report_at = now + 5
        time.sleep(0.02)


def load_figures(workload: Workload, run: LoadRun, workers: list[dict[str, Any]], events: int) -> dict[str, Any]:
    """The figures of one load phase, from the statuses and the workers' closing counters."""
    statuses = run.statuses
    count = len(statuses)
    latencies = [latency_ms(s) for s in statuses]
    span = (max(s.updated_at for s in statuses) - min(s.created_at for s in statuses)).total_seconds()
    sagas_per_s = count / span if span > 0 else float("inf")
    totals = Counter[str]()
    for figures in workers:
        totals.update({key: figures[key] for key in ("claims", "saves", "releases", "attempts", "conflicts")})
    transactions = totals["claims"] + totals["saves"] + totals["releases"] + run.start_transactions + run.sends
    return {
        "finished": sum(1 for s in statuses if s.state is workload.final),
        "states": dict(Counter(s.state.value for s in statuses)),
        "sagas_per_s": sagas_per_s,
        "steps_per_s": sagas_per_s * workload.attempts,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "span_s": span,
        "submit_s": run.submit_s,
        "wall_s": run.wall_s,
        "transactions_per_saga": transactions / count,
        "claims_per_saga": totals["claims"] / count,
        "saves_per_saga": totals["saves"] / count,
        "releases_per_saga": totals["releases"] / count,
        "bench_transactions_per_saga": (run.start_transactions + run.sends) / count,
        "attempts_per_saga": totals["attempts"] / count,
        "conflicts": totals["conflicts"],
        "events_per_saga": events / count,
        "peak_rss_mb": max(figures["peak_rss_mb"] for figures in workers),
        "worker_warnings": sum(figures["warnings"] for figures in workers),
    }


STATUS_FILTERS: list[tuple[SagaState, str]] = [
    (SagaState.PENDING, "BenchOk"),
    (SagaState.COMPLETED, "BenchOk"),
    (SagaState.COMPENSATED, "BenchCompensate"),
    (SagaState.WAITING, "BenchWait"),
    (SagaState.PENDING, "BenchWait"),
]
"""The ``list(state=, saga=)`` filters the ``status`` workload cycles through."""


def store_sagas(orch: Orchestrator, sagas: int, batch: int, say: Say) -> list[str]:
    """Store ``sagas`` sagas of the three bench kinds; run a few of them to their end or their wait first.

    Most stay ``pending`` (nothing runs them), which is what a status read sees of a busy
    system anyway; the few that ran give the filtered lists other states to find.
    """
    share = max(1, min(2000, sagas // 100) // len(BENCH_SAGAS))
    ids: list[str] = []
    for saga in BENCH_SAGAS:
        ids += orch.start_many(saga, [{"n": n} for n in range(share)])
    began = time.perf_counter()
    with saga_lines_dropped():  # the compensate sagas fail on purpose: that is the data, not news
        orch.run_worker(wait=False, poll_interval=0.01)
    say(f"  ran {len(ids)} sagas to their end (or their wait) in {time.perf_counter() - began:.1f} s")
    rest = sagas - len(ids)
    say(f"  storing {rest} more sagas, {batch} per transaction, in {fill_processes(orch, rest, batch)} process(es)")
    for part in spread(orch, fill, rest, batch):
        ids += part
    return ids


def fill_processes(orch: Orchestrator, count: int, batch: int) -> int:
    """How many processes store ``count`` sagas: two on PostgreSQL when there is enough to share (one
    builds events while the other writes, about 1.5 times as fast as one), else this one."""
    return FILL_PROCESSES if orch.database.is_postgres and count >= 20 * batch else 1


def spread(orch: Orchestrator, work: Callable[..., T], count: int, batch: int) -> list[T]:
    """``work(url, share, batch[, orch])`` over ``count`` sagas, in ``fill_processes`` processes;
    each share's result."""
    processes = fill_processes(orch, count, batch)
    if processes == 1:
        return [work(orch.database.url, count, batch, orch)]
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(work, [orch.database.url] * processes, shares, [batch] * processes))


@contextmanager
def saga_lines_dropped() -> Iterator[None]:
    """Drop the log lines about single sagas (their steps failing, say) in this process for a while."""
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[_drop_saga_lines, *processors])
    try:
        yield
    finally:
        structlog.configure(processors=processors)


def _drop_saga_lines(logger: Any, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    if "saga_id" in event:
        raise structlog.DropEvent
    return event


def fill(url: str, count: int, batch: int, orch: Orchestrator | None = None) -> list[str]:
    """Start ``count`` sagas of the three kinds in turn, ``batch`` per transaction (nothing runs them)."""
    own = orch is None
    orch = orch or app(url).open()
    try:
        ids: list[str] = []
        for index, numbers in enumerate(chunks(count, batch)):
            ids += orch.start_many(BENCH_SAGAS[index % len(BENCH_SAGAS)], [{"n": n} for n in numbers])
        return ids
    finally:
        if own:
            orch.close()


def preload_finished(orch: Orchestrator, sagas: int, batch: int, say: Say) -> float:
    """Store ``sagas`` completed ``BenchOk`` sagas with their whole histories (8 events each), as a
    busy system keeps them; seconds it took. Their histories are made in the bench (the machine
    run by hand, no worker) and written ``batch`` per transaction, from two processes on PostgreSQL."""
    began = time.perf_counter()
    spread(orch, fill_finished, sagas, batch)
    seconds = time.perf_counter() - began
    # In a system that ran them, the log's followers (triggers, notifications) read these sagas'
    # ends as they happened, finding nothing to do: put them where they would be by now.
    head = max_event(orch)
    for follower in (orch.trigger_processor, orch.notifications.notifier):
        orch.repository.index.advance(Tracking(tracking_name(follower.name), head))
    say(f"  preloaded {sagas} completed sagas in {seconds:.1f} s")
    return seconds


def fill_finished(url: str, count: int, batch: int, orch: Orchestrator | None = None) -> None:
    """Store ``count`` completed ``BenchOk`` sagas, ``batch`` per transaction."""
    own = orch is None
    orch = orch or app(url).open()
    policies = policies_of(BenchOk)
    try:
        for numbers in chunks(count, batch):
            aggregates = []
            for n in numbers:
                aggregate = SagaAggregate.begin(BenchOk, {"n": n}, None, None, orch.settings.max_input_bytes)
                now = aggregate.run.created_at
                while (work := aggregate.advance(now, "preload", 30.0, policies)) is not None:
                    aggregate.record_outcome(work, Outcome(), now, policies)
                aggregates.append(aggregate)
            orch.repository.save(aggregates, wake=False)
    finally:
        if own:
            orch.close()


def read_latencies(orch: Orchestrator, ids: list[str], status_calls: int, list_calls: int) -> dict[str, Any]:
    """Time ``status(id)`` on random ids and filtered ``list()`` pages of 50; latencies in ms."""
    rng = random.Random(42)
    sample = [rng.choice(ids) for _ in range(status_calls)]
    for saga_id in sample[:20]:  # warm the pool, the prepared statements and the page cache
        orch.status(saga_id)
    status_ms = []
    for saga_id in sample:
        began = time.perf_counter()
        orch.status(saga_id)
        status_ms.append((time.perf_counter() - began) * 1000)
    for state, saga in STATUS_FILTERS:
        orch.list(state=state, saga=saga, limit=50)
    list_ms = []
    found = Counter[str]()
    for call in range(list_calls):
        state, saga = STATUS_FILTERS[call % len(STATUS_FILTERS)]
        began = time.perf_counter()
        page = orch.list(state=state, saga=saga, limit=50)
        list_ms.append((time.perf_counter() - began) * 1000)
        found[f"{saga}:{state.value}"] = len(page)
    return {
        "status_p50_ms": percentile(status_ms, 50),
        "status_p99_ms": percentile(status_ms, 99),
        "list_p50_ms": percentile(list_ms, 50),
        "list_p99_ms": percentile(list_ms, 99),
        "list_page_sizes": dict(found),
    }
