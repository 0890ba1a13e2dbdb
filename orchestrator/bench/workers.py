"""Workers for the bench: ``saga worker`` subprocesses, or one worker thread in the bench process.

Either kind starts, reports when it is ready, and on ``stop()`` returns each worker's
closing figures: the counters of the "worker stopped" log line (``claims``, ``saves``,
``releases``, ``attempts``, ``conflicts``) and ``peak_rss_mb``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Protocol

from orchestrator import Orchestrator

WORKER_APP = "orchestrator.bench.workloads:worker_app"
COUNTERS = ("claims", "saves", "releases", "attempts", "conflicts")


class Workers(Protocol):
    """A set of running workers."""

    def start(self, timeout: float = 60.0) -> None:
        """Start the workers and return once each is ready to claim work."""

    def alive(self) -> bool:
        """Whether every worker is still running."""

    def failure(self) -> str:
        """Why a worker that is no longer alive ended."""

    def terminate(self) -> None:
        """Ask the workers to stop, without waiting for them."""

    def stop(self) -> list[dict[str, Any]]:
        """Stop the workers (they finish the attempts in hand) and return their closing figures."""


def worker_trouble(record: dict[str, Any]) -> bool:
    """Whether a log line is a warning about the worker itself; the failures of sagas (the compensate
    workload's, say) are the workload, not trouble."""
    return record.get("level") in ("warning", "error", "critical") and "saga_id" not in record


class WorkerProcess:
    """One ``saga worker`` subprocess whose stderr is read by a thread."""

    def __init__(self, database_url: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--log-level",
                "warning",
                "--json-logs",
                "worker",
                "--app",
                WORKER_APP,
            ],
            env={**os.environ, **env, "SAGA_DATABASE_URL": database_url},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ready = threading.Event()
        self.lines: list[dict[str, Any]] = []
        """The worker's JSON log lines (all of them warnings or worse, but "worker started/stopped")."""
        self.other: list[str] = []
        """Lines that are not JSON, such as a traceback."""
        self.reader = threading.Thread(target=self._read, name=f"bench-stderr-{self.process.pid}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.other.append(line.rstrip())
                continue
            if not isinstance(record, dict):
                self.other.append(line.rstrip())
                continue
            self.lines.append(record)
            if record.get("event") == "worker started":
                self.ready.set()
            elif worker_trouble(record):
                print(f"  worker {self.process.pid}: {line.rstrip()}", file=sys.stderr, flush=True)

    def describe_failure(self) -> str:
        """What the worker said before it died, for an error message."""
        tail = self.other[-20:] or [json.dumps(line) for line in self.lines[-5:]]
        return f"worker {self.process.pid} exited with {self.process.returncode}:\n" + "\n".join(tail)

    def stopped(self) -> dict[str, Any]:
        """The figures of the "worker stopped" line (empty counters if it never came)."""
        self.reader.join(timeout=10)
        final = next((line for line in reversed(self.lines) if line.get("event") == "worker stopped"), None)
        if final is None:
            raise RuntimeError("no 'worker stopped' line: " + self.describe_failure())
        figures: dict[str, Any] = {key: int(final.get(key, 0)) for key in COUNTERS}
        figures["peak_rss_mb"] = float(final.get("peak_rss_mb", 0.0))
        figures["pid"] = self.process.pid
        figures["warnings"] = sum(1 for line in self.lines if worker_trouble(line))
        return figures


class WorkerProcesses:
    """``count`` worker subprocesses on one database (the way workers run in production)."""

    def __init__(self, database_url: str, count: int, env: dict[str, str] | None = None) -> None:
        self.database_url = database_url
        self.count = count
        self.env = env or {}
        self.workers: list[WorkerProcess] = []

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the workers and wait for each one's "worker started" line."""
        self.workers = [WorkerProcess(self.database_url, self.env) for _ in range(self.count)]
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            while not worker.ready.wait(0.05):
                if worker.process.poll() is not None:
                    worker.reader.join(timeout=5)
                    self.kill()
                    raise RuntimeError(worker.describe_failure())
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"worker {worker.process.pid} not ready after {timeout} s")

    def alive(self) -> bool:
        """Whether every worker is still running."""
        return all(worker.process.poll() is None for worker in self.workers)

    def failure(self) -> str:
        """What the dead workers said."""
        return "\n".join(w.describe_failure() for w in self.workers if w.process.poll() is not None)

    def terminate(self) -> None:
        """SIGTERM every worker: each finishes the attempts in hand and exits."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM every worker, wait for them to exit, and read their "worker stopped" lines."""
        self.terminate()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
                raise RuntimeError(f"worker {worker.process.pid} did not stop within 60 s of SIGTERM") from None
        return [worker.stopped() for worker in self.workers]

    def kill(self) -> None:
        """Kill every worker at once (on an error)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()


class ThreadWorker:
    """One worker in a thread of the bench process: the only way to bench the in-memory backend.

    It shares the process (and the GIL) with the bench's own polling, and its peak RSS is the
    bench process's.
    """

    def __init__(self, orch: Orchestrator, env: dict[str, str] | None = None) -> None:
        from orchestrator.worker import Worker

        env = env or {}
        concurrency = env.get("SAGA_CONCURRENCY")
        batch_size = env.get("SAGA_BATCH_SIZE")
        self.worker = Worker(
            orch,
            concurrency=int(concurrency) if concurrency else None,
            batch_size=int(batch_size) if batch_size else None,
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(drain=False)
        except BaseException as error:
            self.error = error
            raise

    def start(self, timeout: float = 60.0) -> None:
        """Start the worker thread."""
        self.thread.start()

    def alive(self) -> bool:
        """Whether the worker thread still runs."""
        return self.thread.is_alive()

    def failure(self) -> str:
        """Why the worker thread ended."""
        return f"the worker thread ended: {self.error!r}"

    def terminate(self) -> None:
        """Ask the worker thread to stop."""
        self.worker.stop()

    def stop(self) -> list[dict[str, Any]]:
        """Stop the worker thread and return its counters."""
        self.worker.stop()
        self.thread.join(timeout=60)
        figures: dict[str, Any] = {key: int(self.worker.stats.get(key, 0)) for key in COUNTERS}
        figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        figures["pid"] = os.getpid()
        figures["warnings"] = 0
        return [figures]
