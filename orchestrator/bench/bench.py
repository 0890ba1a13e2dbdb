"""``saga bench``: run a workload on a fresh database and print its figures, last as one JSON line.

For ``ok``, ``compensate`` and ``wait`` each run has two phases on its own database:
*unloaded* (one worker, one saga at a time: ``unloaded_p50_ms``) and *load* (W workers,
N sagas started in batches as fast as the bench can: throughput, latency under load,
transactions and events per saga, worker RSS). ``status`` stores N sagas and times
``status()`` and filtered ``list()`` reads. ``--limit`` adds the storage's own ceiling,
single-row INSERT+COMMIT on 1 and 4 connections on the same database, and every
throughput as a ratio to it. ``--runs R`` repeats on fresh databases and reports medians.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator import ConfigurationError, Orchestrator, Settings
from orchestrator.bench import phases
from orchestrator.bench.databases import analyze_status, fresh_database, insert_commit_rate
from orchestrator.bench.phases import Say, max_event, percentile
from orchestrator.bench.workers import ThreadWorker, WorkerProcesses, Workers
from orchestrator.bench.workloads import WORKLOADS, app

WORKLOAD_NAMES = (*WORKLOADS, "status")
STATUS_SAGAS = 200_000
"""Sagas the ``status`` workload stores unless ``--sagas`` says otherwise."""
SAGA_SAGAS = 5_000
"""Sagas the other workloads run unless ``--sagas`` says otherwise."""
REQUIRED_KEYS = (
    "backend",
    "workload",
    "sagas",
    "workers",
    "finished",
    "sagas_per_s",
    "steps_per_s",
    "p50_ms",
    "p99_ms",
    "unloaded_p50_ms",
    "transactions_per_saga",
    "events_per_saga",
    "peak_rss_mb",
)
"""Keys the JSON line always has (``None`` where a figure does not apply to the workload)."""


@dataclass(frozen=True)
class BenchOptions:
    """What to run: the command line of ``saga bench``."""

    workload: str = "ok"
    backend: str = "sqlite"
    sagas: int | None = None
    """Sagas per run; default 5,000 (200,000 for ``status``)."""
    workers: int = 2
    """Worker processes in the load phase; 0 runs one worker in a thread of the bench process."""
    database: str | None = None
    """The PostgreSQL server (a fresh schema is made on it); default ``SAGA_DATABASE_URL`` or local."""
    limit: bool = False
    runs: int = 1
    unloaded_samples: int = 30
    start_batch: int = 200
    """Sagas per ``start_many`` transaction in the load phase."""
    concurrency: int | None = None
    """``SAGA_CONCURRENCY`` of the workers (default: the environment's, else the engine's)."""
    batch_size: int | None = None
    """``SAGA_BATCH_SIZE`` of the workers (default: the environment's, else the engine's)."""
    limit_seconds: float = 3.0
    status_calls: int = 2_000
    list_calls: int = 300

    @property
    def count(self) -> int:
        """Sagas per run."""
        return self.sagas or (STATUS_SAGAS if self.workload == "status" else SAGA_SAGAS)

    def worker_env(self) -> dict[str, str]:
        """Environment overrides for the worker processes."""
        env = {}
        if self.concurrency is not None:
            env["SAGA_CONCURRENCY"] = str(self.concurrency)
        if self.batch_size is not None:
            env["SAGA_BATCH_SIZE"] = str(self.batch_size)
        return env

    def check(self) -> None:
        """Refuse combinations that cannot run, before anything is created."""
        if self.workload not in WORKLOAD_NAMES:
            raise ConfigurationError(f"unknown workload {self.workload!r}; workloads are {', '.join(WORKLOAD_NAMES)}")
        if self.backend == "memory" and self.workers != 0 and self.workload != "status":
            raise ConfigurationError(
                "the memory backend lives in one process, so worker processes cannot share it: "
                "use --workers 0 (one worker in a thread of the bench process)"
            )
        if self.database is not None and self.backend != "postgres":
            raise ConfigurationError(f"--database names a PostgreSQL server; --backend {self.backend} makes its own")
        if self.workload == "status" and self.count < 10:
            raise ConfigurationError("the status workload needs --sagas 10 or more")


def run_bench(options: BenchOptions, say: Say) -> dict[str, Any]:
    """Run the bench and return the figures that the JSON line reports."""
    options.check()
    settings = Settings.from_env()
    if options.workload == "status":
        who = "reads from the bench process"
    elif options.workers == 0:
        who = "1 worker in a thread of the bench process"
    else:
        who = f"{options.workers} worker process{'es' if options.workers != 1 else ''}"
    say(
        f"saga bench: workload {options.workload}, backend {options.backend}, {options.count} sagas, {who},"
        f" {options.runs} run{'s' if options.runs != 1 else ''}"
    )
    runs = []
    limit: dict[str, Any] = {}
    for number in range(1, options.runs + 1):
        with fresh_database(options.backend, options.database) as url:
            if options.runs > 1:
                say(f"run {number} of {options.runs}")
            runs.append(run_once(options, url, say))
            if options.limit and not limit:
                limit = measure_limit(url, options.limit_seconds, say)
    result: dict[str, Any] = {
        "backend": options.backend,
        "workload": options.workload,
        "sagas": options.count,
        "workers": 0 if options.workload == "status" else options.workers,
        **summarise(runs),
        **limit,
    }
    if limit:
        result.update(ratios(result))
    result.update(
        concurrency=options.concurrency or settings.concurrency,
        batch_size=options.batch_size or settings.batch_size,
        poll_interval=settings.poll_interval,
        runs=runs if len(runs) > 1 else None,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return {key: result.get(key) for key in REQUIRED_KEYS} | {k: v for k, v in result.items() if v is not None}


def run_once(options: BenchOptions, url: str, say: Say) -> dict[str, Any]:
    """One run on one fresh database."""
    with app(url) as orch:
        if options.workload == "status":
            return run_status(options, orch, say)
        return run_sagas(options, orch, url, say)


def start_workers(options: BenchOptions, orch: Orchestrator, url: str, count: int) -> Workers:
    """``count`` worker processes, or (with ``--workers 0``) one worker thread; started and ready."""
    workers: Workers = (
        ThreadWorker(orch, options.worker_env())
        if options.workers == 0
        else WorkerProcesses(url, count, options.worker_env())
    )
    workers.start()
    return workers


def run_sagas(options: BenchOptions, orch: Orchestrator, url: str, say: Say) -> dict[str, Any]:
    """The unloaded phase, then the load phase, of a saga workload."""
    workload = WORKLOADS[options.workload]
    figures: dict[str, Any] = {"unloaded_p50_ms": None}
    unloaded = None
    if options.unloaded_samples > 0:
        unloaded = start_workers(options, orch, url, 1)
        try:
            samples = phases.unloaded_latency(orch, workload, options.unloaded_samples, unloaded)
        except BaseException:
            unloaded.stop()
            raise
        unloaded.terminate()  # it has nothing left to do; the load's workers start while it exits
        figures["unloaded_p50_ms"] = percentile(samples, 50)
        figures["unloaded_max_ms"] = max(samples)
        say(f"  unloaded: p50 {figures['unloaded_p50_ms']:.1f} ms over {len(samples)} sagas, one at a time")
    workers = start_workers(options, orch, url, options.workers)
    if unloaded is not None:
        # A worker that ran a few dozen sagas: the baseline that the load's peak RSS grows from.
        figures["unloaded_rss_mb"] = max(f["peak_rss_mb"] for f in unloaded.stop())
    first = max_event(orch)
    try:
        load = phases.run_load(orch, workload, options.count, options.start_batch, workers, say)
    except BaseException:
        if isinstance(workers, WorkerProcesses):
            workers.kill()
        raise
    closing = workers.stop()
    figures.update(phases.load_figures(workload, load, closing, max_event(orch) - first))
    say(
        f"  load: {figures['finished']} of {options.count} {workload.final.value},"
        f" {figures['sagas_per_s']:.0f} sagas/s,"
        f" p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms,"
        f" {figures['transactions_per_saga']:.2f} transactions and {figures['events_per_saga']:.1f} events per saga"
    )
    return figures


def run_status(options: BenchOptions, orch: Orchestrator, say: Say) -> dict[str, Any]:
    """Store the sagas, then time ``status()`` and filtered ``list()`` reads."""
    began = time.perf_counter()
    ids = phases.store_sagas(orch, options.count, 1_000, say)
    setup_s = time.perf_counter() - began
    say(f"  stored {len(ids)} sagas in {setup_s:.1f} s")
    analyzed = analyze_status(orch)
    reads = phases.read_latencies(orch, ids, options.status_calls, options.list_calls)
    say(
        f"  status(): p50 {reads['status_p50_ms']:.2f} ms, p99 {reads['status_p99_ms']:.2f} ms;"
        f" list(): p50 {reads['list_p50_ms']:.2f} ms, p99 {reads['list_p99_ms']:.2f} ms"
    )
    return {
        "finished": len(ids),
        "setup_s": setup_s,
        "analyzed": analyzed,
        "stored_per_s": len(ids) / setup_s,
        "events_per_saga": max_event(orch) / len(ids),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **reads,
    }


def measure_limit(url: str, seconds: float, say: Say) -> dict[str, Any]:
    """Single-row INSERT+COMMIT per second on 1 and on 4 connections, on the bench's database."""
    one = insert_commit_rate(url, 1, seconds)
    four = insert_commit_rate(url, 4, seconds)
    if one is None or four is None:
        say("  limit: the memory backend has no commits to measure")
        return {"limit_commits_per_s_1": None, "limit_commits_per_s_4": None}
    say(f"  limit: {one:.0f} commits/s on 1 connection, {four:.0f} on 4")
    return {"limit_commits_per_s_1": one, "limit_commits_per_s_4": four}


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Throughput read against the storage limit: what share of the bare commit rate the engine reaches."""
    one, four = result.get("limit_commits_per_s_1"), result.get("limit_commits_per_s_4")
    sagas, transactions = result.get("sagas_per_s"), result.get("transactions_per_saga")
    if not one or not four or sagas is None:
        return {}
    return {
        "sagas_per_s_over_limit_1": sagas / one,
        "steps_per_s_over_limit_1": result["steps_per_s"] / one,
        "sagas_per_s_over_limit_4": sagas / four,
        "transactions_per_s_over_limit_4": sagas * transactions / four,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over the runs (``finished``: the fewest)."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [run.get(key) for run in runs]
        if key == "finished":
            summary[key] = min(v for v in values if isinstance(v, int))
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            summary[key] = statistics.median(values)  # type: ignore[type-var]
        else:
            summary[key] = value
    return summary


def rounded(value: Any) -> Any:
    """Floats to three significant decimals, recursively, for a readable JSON line."""
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 10 else 1)
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def json_line(result: dict[str, Any]) -> str:
    """The result as the one JSON line ``saga bench`` prints last."""
    return json.dumps(rounded(result), separators=(", ", ": "))
