"""Smoke tests of ``saga bench``: tiny runs as a real subprocess, and its pure helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from orchestrator.bench.bench import REQUIRED_KEYS, summarise
from orchestrator.bench.phases import percentile
from orchestrator.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SAGA_KEYS = (
    "sagas_per_s",
    "steps_per_s",
    "p50_ms",
    "p99_ms",
    "unloaded_p50_ms",
    "transactions_per_saga",
    "events_per_saga",
    "peak_rss_mb",
)


def bench(*args: str) -> dict[str, Any]:
    """Run ``python -m orchestrator bench`` and return its last stdout line, parsed as JSON."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAGA_POLL_INTERVAL": "0.05",  # SQLite workers poll: keep the smoke test short
    }
    env.pop("SAGA_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "bench", "--sagas", "20", "--unloaded-samples", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) > 1, "progress lines come before the JSON line"
    result: dict[str, Any] = json.loads(lines[-1])
    assert set(REQUIRED_KEYS) <= result.keys()
    return result


def check_sagas(result: dict[str, Any], backend: str, workload: str) -> None:
    """Every saga finished as its workload says, and every figure was measured."""
    assert (result["backend"], result["workload"], result["workers"]) == (backend, workload, 1)
    assert result["sagas"] == result["finished"] == 20
    for key in SAGA_KEYS:
        assert result[key] > 0, key
    attempts = {"ok": 3, "compensate": 5}[workload]
    assert result["attempts_per_saga"] == attempts
    assert result["steps_per_s"] == pytest.approx(result["sagas_per_s"] * attempts, rel=0.01)


@pytest.mark.parametrize("workload", ["ok", "compensate"])
def test_bench_on_sqlite(workload: str) -> None:
    """On SQLite, a tiny bench with one worker process finishes every saga and reports every figure."""
    check_sagas(bench("--backend", "sqlite", "--workers", "1", "--workload", workload), "sqlite", workload)


@pytest.mark.postgres
@pytest.mark.parametrize("workload", ["ok", "compensate"])
def test_bench_on_postgres(workload: str, pg_server: str) -> None:
    """On PostgreSQL (a bench_* schema of its own), a tiny bench with the storage limit reports every figure."""
    result = bench(
        "--backend",
        "postgres",
        "--database",
        pg_server,
        "--workers",
        "1",
        "--workload",
        workload,
        *(["--limit", "--limit-seconds", "0.3"] if workload == "ok" else []),
    )
    check_sagas(result, "postgres", workload)
    if workload == "ok":
        assert result["limit_commits_per_s_1"] > 0
        assert result["limit_commits_per_s_4"] > 0
        assert result["sagas_per_s_over_limit_1"] > 0


HTTP_KEYS = (
    "python_starts_per_s",
    "python_start_p50_ms",
    "python_start_p99_ms",
    "http_starts_per_s",
    "http_vs_python",
    "http_start_p50_ms",
    "http_start_p99_ms",
    "polls",
    "polls_per_s",
    "poll_p50_ms",
    "poll_p99_ms",
    "stored_sagas",
    "peak_rss_mb",
)


@pytest.mark.postgres
def test_bench_http_on_postgres(pg_server: str) -> None:
    """On PostgreSQL, the http workload starts sagas through orch.start() and a saga serve subprocess,
    polls them over HTTP, and reports every figure (after preloading a few sagas)."""
    result = bench(
        "--backend",
        "postgres",
        "--database",
        pg_server,
        "--workload",
        "http",
        "--sagas",
        "40",
        "--preload",
        "30",
        "--poll-seconds",
        "0.5",
    )
    assert (result["backend"], result["workload"], result["workers"]) == ("postgres", "http", 0)
    assert result["sagas"] == result["finished"] == 40
    for key in HTTP_KEYS:
        assert result[key] > 0, key
    assert result["http_vs_python"] == pytest.approx(
        result["http_starts_per_s"] / result["python_starts_per_s"], rel=0.05
    )
    assert result["preloaded"] == 30
    # The preload, and the 40 sagas of each phase with each of the 8 clients' 3 untimed warm-up starts.
    assert result["stored_sagas"] == 30 + 2 * (40 + 8 * 3)


def test_serve_process_is_ended_even_on_error(tmp_path: Path) -> None:
    """The bench's saga serve subprocess answers while in use, and is gone after an error in the with block."""
    import httpx

    from orchestrator.bench.server import ServeProcess

    server = ServeProcess(f"sqlite:///{tmp_path / 'serve.db'}")
    processes: list[subprocess.Popen[bytes]] = []

    def use_then_fail() -> None:
        with server:
            assert server.process is not None
            processes.append(server.process)
            assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
            raise ZeroDivisionError("the error the server must not outlive")

    with pytest.raises(ZeroDivisionError):
        use_then_fail()
    assert processes[0].poll() is not None
    assert not server.alive()


def test_http_workload_refuses_the_memory_backend() -> None:
    """saga serve runs in another process, so the memory backend is refused before anything starts."""
    outcome = CliRunner().invoke(cli, ["bench", "--workload", "http", "--backend", "memory"])
    assert outcome.exit_code == 1
    assert "--backend sqlite or postgres" in outcome.output


def test_bench_status_reads_on_sqlite() -> None:
    """The status workload stores the sagas and reports status() and list() latencies."""
    result = bench("--backend", "sqlite", "--workload", "status", "--sagas", "300")
    assert result["sagas"] == result["finished"] == 300
    for key in ("status_p50_ms", "status_p99_ms", "list_p50_ms", "list_p99_ms"):
        assert result[key] > 0, key


def test_memory_backend_needs_the_in_process_worker() -> None:
    """The memory backend with worker processes is refused with a clear message, before anything runs."""
    outcome = CliRunner().invoke(cli, ["bench", "--backend", "memory", "--workers", "2"])
    assert outcome.exit_code == 1
    assert "--workers 0" in outcome.output


def test_percentile_interpolates_between_ranks() -> None:
    """Percentiles interpolate linearly between the nearest ranks, as numpy's default does."""
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def test_summary_of_runs_is_the_median_and_the_fewest_finished() -> None:
    """Over several runs each figure is the median, and ``finished`` the worst run's count."""
    runs = [
        {"sagas_per_s": 100.0, "finished": 20},
        {"sagas_per_s": 300.0, "finished": 19},
        {"sagas_per_s": 200.0, "finished": 20},
    ]
    assert summarise(runs) == {"sagas_per_s": 200.0, "finished": 19}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_bench_events_compares_triggered_starts_with_direct_ones(backend: str, request: pytest.FixtureRequest) -> None:
    """The events workload starts 20 sagas directly and 20 through a trigger and reports both rates,
    their ratio and the trigger lag."""
    database = ["--database", request.getfixturevalue("pg_server")] if backend == "postgres" else []
    result = bench("--backend", backend, *database, "--workers", "1", "--workload", "events")
    assert result["finished"] == 20
    for key in ("direct_starts_per_s", "emits_per_s", "event_starts_per_s", "trigger_lag_p50_ms"):
        assert result[key] > 0, key
    assert result["events_vs_direct"] == pytest.approx(
        result["event_starts_per_s"] / result["direct_starts_per_s"], rel=0.02
    )
    assert result["trigger_lag_p99_ms"] >= result["trigger_lag_p50_ms"]


def test_bench_starts_from_several_submitters_one_saga_or_a_batch_per_call() -> None:
    """--submitters and --start-batch reach the load phase: every saga finishes and the JSON line
    says how they were started; one saga per call is the default."""
    batched = bench("--backend", "sqlite", "--workers", "1", "--submitters", "3", "--start-batch", "4")
    assert (batched["submitters"], batched["start_batch"], batched["finished"]) == (3, 4, 20)
    single = bench("--backend", "sqlite", "--workers", "1")
    assert (single["submitters"], single["start_batch"], single["finished"]) == (8, 1, 20)
    assert single["bench_transactions_per_saga"] <= 1


@pytest.mark.postgres
def test_bench_preloads_completed_sagas_before_measuring(pg_server: str) -> None:
    """--preload stores that many completed sagas first; the measured sagas still all finish, and
    the followers start past the preloaded ends (no trigger or notification work is left behind)."""
    result = bench("--backend", "postgres", "--database", pg_server, "--workers", "1", "--preload", "60")
    assert (result["preloaded"], result["finished"]) == (60, 20)
    assert result["preload_s"] > 0
    check_sagas(result, "postgres", "ok")


def test_preload_is_refused_for_the_events_workload() -> None:
    """The events workload compares two start paths on an empty log, so --preload is refused up front."""
    outcome = CliRunner().invoke(cli, ["bench", "--workload", "events", "--preload", "100"])
    assert outcome.exit_code == 1
    assert "--preload is for the saga, status and http workloads" in outcome.output
