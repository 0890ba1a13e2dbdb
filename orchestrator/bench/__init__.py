"""The harness behind ``saga bench``: throughput and latency of the engine, read against the storage's limit.

``saga bench --workload ok|compensate|wait|status|http --backend sqlite|postgres|memory --sagas N
--workers W [--database URL] [--limit] [--runs R] [--preload P] [--json-only]`` runs on a fresh
database (a ``bench_*`` schema, or a temporary SQLite file, removed afterwards), prints progress,
and last one JSON line. ``workloads`` holds the sagas (and ``app`` for the worker processes),
``workers`` starts and stops them, ``server`` does the same for the ``saga serve`` of the
``http`` workload, whose concurrent callers are in ``clients``; ``phases`` measures,
``databases`` makes databases and probes their commit rate, ``bench`` puts a run together.
"""

from orchestrator.bench.bench import REQUIRED_KEYS, BenchOptions, json_line, run_bench

__all__ = ["REQUIRED_KEYS", "BenchOptions", "json_line", "run_bench"]
