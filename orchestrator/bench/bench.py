"""``saga bench``: run a workload on a fresh database and print its figures, last as one JSON line.

For ``ok``, ``compensate`` and ``wait`` each run has two phases on its own database:
*unloaded* (one worker, one saga at a time: ``unloaded_p50_ms``) and *load* (W workers,
N sagas started by K submitter threads, one ``start()`` each unless ``--start-batch`` says
otherwise: throughput, latency under load, transactions and events per saga, worker RSS).
``--preload P`` first stores P completed sagas with their histories (the saga and status
workloads), to measure on a full database. ``status`` stores N sagas and times
``status()`` and filtered ``list()`` reads. ``http`` starts N sagas one ``orch.start()`` at a
time from C threads (the Python API's rate), then N through ``POST /sagas/BenchOk`` of a
``saga serve`` subprocess from C clients, then polls ``GET /sagas/{id}`` for a few seconds
(``--preload P`` first stores P more sagas, so that the polls read a big table). ``--limit``
adds the storage's own ceiling, single-row INSERT+COMMIT on 1 and 4 connections on the same
database, and every throughput as a ratio to it. ``--runs R`` repeats on fresh databases and
reports medians.
"""

from __future__ import annotations

import json
import resource
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator import ConfigurationError, Orchestrator, Settings
from orchestrator.bench import clients, events, phases
from orchestrator.bench.databases import analyze_status, fresh_database, insert_commit_rate
from orchestrator.bench.phases import Say, max_event, percentile
from orchestrator.bench.server import ServeProcess
from orchestrator.bench.workers import ThreadWorker, WorkerProcesses, Workers
from orchestrator.bench.workloads import WORKLOADS, app

WORKLOAD_NAMES = (*WORKLOADS, "status", "http", "events")
NO_WORKERS = ("status", "http")
"""The workloads that run no workers: they measure starts and reads."""
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
    start_batch: int = 1
    """Sagas per call in the load phase: 1 is one ``start()`` each (as applications start them), more
    is ``start_many`` of that many."""
    submitters: int = 8
    """Threads that start the load phase's sagas at once (their starts share transactions: group commit)."""
    concurrency: int | None = None
    """``SAGA_CONCURRENCY`` of the workers (default: the environment's, else the engine's)."""
    batch_size: int | None = None
    """``SAGA_BATCH_SIZE`` of the workers (default: the environment's, else the engine's)."""
    limit_seconds: float = 3.0
    status_calls: int = 2_000
    list_calls: int = 300
    preload: int = 0
    """``http``: finished and pending sagas stored before the starts, so that the polls read a big table."""
    clients: int = 8
    """``http``: concurrent callers (threads) of ``orch.start()``, of the HTTP starts and of the polls."""
    poll_seconds: float = 5.0
    """``http``: how long the callers poll."""

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
        if self.workload == "http" and self.backend == "memory":
            raise ConfigurationError(
                "the http workload serves the database from a saga serve subprocess, which cannot share"
                " the memory backend: use --backend sqlite or postgres"
            )
        if self.backend == "memory" and self.workers != 0 and self.workload not in NO_WORKERS:
            raise ConfigurationError(
                "the memory backend lives in one process, so worker processes cannot share it: "
                "use --workers 0 (one worker in a thread of the bench process)"
            )
        if self.database is not None and self.backend != "postgres":
            raise ConfigurationError(f"--database names a PostgreSQL server; --backend {self.backend} makes its own")
        if self.workload == "status" and self.count < 10:
            raise ConfigurationError("the status workload needs --sagas 10 or more")
        if self.preload and self.workload == "events":
            raise ConfigurationError("--preload is for the saga, status and http workloads")
        if 0 < self.preload < 10:
            raise ConfigurationError("--preload stores 10 sagas or more (or 0, nothing)")


def run_bench(options: BenchOptions, say: Say) -> dict[str, Any]:
    """Run the bench and return the figures that the JSON line reports."""
    options.check()
    settings = Settings.from_env()
    if options.workload == "status":
        who = "reads from the bench process"
    elif options.workload == "http":
        preload = f", {options.preload} preloaded" if options.preload else ""
        who = f"{plural(options.clients, 'concurrent caller')}, no workers{preload}"
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
    with sigterm_unwinds():
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
        "workers": 0 if options.workload in NO_WORKERS else options.workers,
        **summarise(runs),
        **limit,
    }
    if limit:
        result.update(ratios(result))
    result.update(
        concurrency=options.concurrency or settings.concurrency,
        batch_size=options.batch_size or settings.batch_size,
        poll_interval=settings.poll_interval,
        submitters=options.submitters if options.workload in WORKLOADS else None,
        start_batch=options.start_batch if options.workload in WORKLOADS else None,
        runs=runs if len(runs) > 1 else None,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return {key: result.get(key) for key in REQUIRED_KEYS} | {k: v for k, v in result.items() if v is not None}


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the bench runs, SIGTERM unwinds it as Ctrl-C does: the subprocesses it started (workers,
    ``saga serve``) are ended and its database removed, instead of being left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_once(options: BenchOptions, url: str, say: Say) -> dict[str, Any]:
    """One run on one fresh database."""
    with app(url) as orch:
        preloaded: dict[str, Any] = {}
        if options.preload and options.workload != "http":
            preloaded["preloaded"] = options.preload
            preloaded["preload_s"] = phases.preload_finished(orch, options.preload, 500, say)
            analyze_status(orch)
        if options.workload == "status":
            return preloaded | run_status(options, orch, say)
        if options.workload == "http":
            return run_http(options, orch, url, say)
        if options.workload == "events":
            return events.run_events(
                orch, options.count, lambda: start_workers(options, orch, url, options.workers), say
            )
        return preloaded | run_sagas(options, orch, url, say)


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
        load = phases.run_load(orch, workload, options.count, options.start_batch, options.submitters, workers, say)
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


def run_http(options: BenchOptions, orch: Orchestrator, url: str, say: Say) -> dict[str, Any]:
    """Preload, start sagas through the Python API, then through ``saga serve``, then poll them over HTTP."""
    saga = WORKLOADS["ok"].saga
    figures: dict[str, Any] = {"clients": options.clients, "preloaded": 0}
    if options.preload:
        began = time.perf_counter()
        figures["preloaded"] = len(phases.store_sagas(orch, options.preload, 1_000, say))
        figures["preload_s"] = time.perf_counter() - began
        say(f"  preloaded {figures['preloaded']} sagas in {figures['preload_s']:.1f} s")
        analyze_status(orch)
    python = clients.python_starts(orch, saga, options.count, options.clients)
    say(
        f"  Python API: {python.calls} sagas, one orch.start() each from {plural(options.clients, 'thread')}:"
        f" {python.per_s:.0f} starts/s, p50 {python.p(50):.1f} ms, p99 {python.p(99):.1f} ms"
    )
    with ServeProcess(url) as server:
        say(f"  saga serve ready on {server.base_url}")
        try:
            starts, polls, serve = http_phases(options, orch, server, python.per_s, say)
        except RuntimeError as error:
            if not server.alive():  # the clients' error is a consequence: say why the server died
                raise RuntimeError(server.describe_failure()) from error
            raise
    stored = sum(n for states in orch.counts().values() for n in states.values())
    say(f"  {stored} sagas stored")
    figures.update(
        finished=starts.calls,
        python_starts_per_s=python.per_s,
        python_start_p50_ms=python.p(50),
        python_start_p99_ms=python.p(99),
        http_starts_per_s=starts.per_s,
        http_vs_python=starts.per_s / python.per_s,
        http_start_p50_ms=starts.p(50),
        http_start_p99_ms=starts.p(99),
        polls=polls.calls,
        polls_per_s=polls.per_s,
        poll_p50_ms=polls.p(50),
        poll_p99_ms=polls.p(99),
        stored_sagas=stored,
        python_cpu_ms_per_start=python.cpu_s / python.calls * 1000,
        client_cpu_ms_per_start=starts.cpu_s / starts.calls * 1000,
        client_cpu_ms_per_poll=polls.cpu_s / polls.calls * 1000,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **serve,
    )
    return figures


def http_phases(
    options: BenchOptions, orch: Orchestrator, server: ServeProcess, python_per_s: float, say: Say
) -> tuple[clients.Timed, clients.Timed, dict[str, Any]]:
    """The starts over HTTP, then the polls; with the server's CPU time per request and its peak RSS."""
    saga = WORKLOADS["ok"].saga
    before = server.figures()
    starts = clients.http_starts(server, saga, options.count, options.clients)
    started = server.figures()
    say(
        f"  HTTP: {starts.calls} POST /sagas/{saga.name} from {plural(options.clients, 'client')}:"
        f" {starts.per_s:.0f} starts/s ({starts.per_s / python_per_s:.0%} of the Python API's),"
        f" p50 {starts.p(50):.1f} ms, p99 {starts.p(99):.1f} ms"
    )
    analyze_status(orch)  # as autovacuum would have by now
    polling = server.figures()
    polls = clients.http_polls(server, starts.results, options.clients, options.poll_seconds)
    after = server.figures()
    say(
        f"  HTTP: {polls.calls} GET /sagas/{{id}} from {plural(options.clients, 'client')} in {polls.wall_s:.1f} s:"
        f" {polls.per_s:.0f} polls/s, p50 {polls.p(50):.2f} ms, p99 {polls.p(99):.2f} ms"
    )
    serve: dict[str, Any] = {"serve_peak_rss_mb": after["peak_rss_mb"]}
    if None not in (before["cpu_s"], started["cpu_s"], polling["cpu_s"], after["cpu_s"]):
        warmups = options.clients * clients.CLIENT_WARMUP  # the untimed calls cost the server too
        serve["serve_cpu_ms_per_start"] = (started["cpu_s"] - before["cpu_s"]) / (starts.calls + warmups) * 1000
        serve["serve_cpu_ms_per_poll"] = (after["cpu_s"] - polling["cpu_s"]) / (polls.calls + warmups) * 1000
    return starts, polls, serve


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


def plural(count: int, noun: str) -> str:
    """``1 client``, ``8 clients``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
