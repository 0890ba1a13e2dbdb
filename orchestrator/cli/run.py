"""The long-running commands: workers, the projection runner, the demo and the benchmark."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from orchestrator.cli.app import app_of, app_option
from orchestrator.logging import configure_logging


@click.command()
@click.option("--concurrency", type=click.IntRange(1), default=None, help="Attempts run at once.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Sagas claimed per transaction.")
@click.option("--drain", is_flag=True, help="Run what is runnable now, then exit.")
@click.option(
    "--metrics-port", type=click.IntRange(1, 65535), default=None, help="Serve Prometheus metrics on this port."
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of the metrics server.")
@app_option
@click.pass_context
def worker(
    ctx: click.Context,
    app_spec: str | None,
    concurrency: int | None,
    batch_size: int | None,
    drain: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run a worker until SIGTERM/SIGINT; it then finishes the attempts in hand and exits."""
    # The worker opens storage itself, waiting with backoff while the database is away.
    orch = app_of(ctx, app_spec, opened=False)
    if metrics_port is not None:
        from orchestrator import metrics

        metrics.serve(orch, metrics_port, metrics_host)
    if orch.run_worker(wait=not drain, concurrency=concurrency, batch_size=batch_size):
        # Hung steps whose threads never returned: the interpreter would wait for them at exit,
        # forever; their leases hand the attempts to other workers.
        orch.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@click.group()
def projections() -> None:
    """Read models built from the histories."""


@projections.command()
@click.argument("name", required=False)
@app_option
@click.pass_context
def rebuild(ctx: click.Context, app_spec: str | None, name: str | None) -> None:
    """Rebuild a projection NAME from the whole event log (without NAME: the saga-status read model)."""
    from projections.status import StatusProjection

    orch = app_of(ctx, app_spec)
    if name is not None:
        batches = orch.rebuild_projection(name)
        click.echo(f"rebuilt projection {name}: {batches} batches; {len(orch.projection(name))} rows")
        return
    progress = StatusProjection(orch).rebuild()
    click.echo(f"rebuilt saga status: {progress.sagas} sagas from {progress.notifications} events")


@projections.command()
@click.option("--poll-interval", type=click.FloatRange(0.01), default=1.0, show_default=True)
@app_option
@click.pass_context
def run(ctx: click.Context, app_spec: str | None, poll_interval: float) -> None:
    """Keep the registered projections current until SIGTERM/SIGINT (one runner per database)."""
    import signal

    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(app_of(ctx, app_spec), poll_interval=poll_interval)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop())
    runner.run()


@projections.command(name="lag")
@app_option
@click.pass_context
def lag(ctx: click.Context, app_spec: str | None) -> None:
    """Print how far each projection is behind the event log, as JSON."""
    click.echo(json.dumps(app_of(ctx, app_spec).projection_lag(), indent=2))


@click.command()
@click.option("--database", default=None, help="Database URL (default: SAGA_DATABASE_URL or sqlite:///sagaworks.db).")
@click.option("--count", type=click.IntRange(1, 1000), default=12, show_default=True, help="Sagas to start.")
@click.pass_context
def demo(ctx: click.Context, database: str | None, count: int) -> None:
    """Run a mix of the example sagas on the embedded database and print their final states."""
    from sagas.demo import run_demo  # the CLI is the composition root; the engine never imports sagas

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        # Progress, not logs: the demo's sagas fail on purpose, and the table shows how they ended.
        configure_logging(json=ctx.parent.params.get("json_logs"), level="critical")
    run_demo(database, count)


@click.command()
@click.option(
    "--workload",
    type=click.Choice(["ok", "compensate", "wait", "status", "http", "events"]),
    default="ok",
    show_default=True,
    help="http: starts through orch.start() vs POST /sagas/BenchOk of a saga serve subprocess, then status polls.",
)
@click.option("--backend", type=click.Choice(["sqlite", "postgres", "memory"]), default="sqlite", show_default=True)
@click.option("--sagas", type=click.IntRange(1), default=None, help="Sagas per run [default: 5000; status: 200000].")
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=2,
    show_default=True,
    help="Worker processes under load; 0 runs one worker in a thread of the bench (the only way for memory).",
)
@click.option(
    "--database",
    default=None,
    help="PostgreSQL server for --backend postgres, where a bench_* schema is made and dropped "
    "[default: SAGA_DATABASE_URL if postgresql, else postgresql://postgres@127.0.0.1:5432/test].",
)
@click.option("--limit", is_flag=True, help="Also measure single-row INSERT+COMMIT/s on 1 and 4 connections.")
@click.option("--limit-seconds", type=click.FloatRange(0.1), default=3.0, show_default=True, help="Per probe.")
@click.option("--runs", type=click.IntRange(1), default=1, show_default=True, help="Fresh databases; medians.")
@click.option("--unloaded-samples", type=click.IntRange(0), default=30, show_default=True)
@click.option(
    "--start-batch",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Sagas per call: 1 is one start() each, more is start_many.",
)
@click.option(
    "--submitters", type=click.IntRange(1), default=8, show_default=True, help="Threads starting the sagas at once."
)
@click.option("--concurrency", type=click.IntRange(1), default=None, help="SAGA_CONCURRENCY of the workers.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="SAGA_BATCH_SIZE of the workers.")
@click.option(
    "--preload",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Store this many sagas first (completed ones with their histories; http: mixed), to measure "
    "on a full database, e.g. --workload ok --backend postgres --preload 1000000.",
)
@click.option("--clients", type=click.IntRange(1), default=8, show_default=True, help="http: concurrent callers.")
@click.option("--poll-seconds", type=click.FloatRange(0.1), default=5.0, show_default=True, help="http: polling time.")
@click.option("--json-only", is_flag=True, help="Print only the JSON line.")
@click.pass_context
def bench(ctx: click.Context, /, json_only: bool, **options: Any) -> None:
    """Measure a workload on a fresh database: throughput, latency, transactions; one JSON line last."""
    from orchestrator.bench import BenchOptions, json_line, run_bench  # the CLI is the composition root

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        configure_logging(json=ctx.parent.params.get("json_logs"), level="warning")  # progress, not logs
    say = (lambda _: None) if json_only else (lambda line: click.echo(line))
    try:
        result = run_bench(BenchOptions(**options), say)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(json_line(result))


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@app_option
@click.pass_context
def serve(ctx: click.Context, app_spec: str | None, host: str, port: int) -> None:
    """Serve the HTTP API, its OpenAPI document (/openapi.json) and the dashboard (/) until SIGTERM/SIGINT."""
    import uvicorn

    from orchestrator.http.app import create_app

    orch = app_of(ctx, app_spec, opened=False)
    if host not in LOOPBACK and orch.settings.api_token is None:
        raise click.UsageError(
            f"refusing to listen on {host} without a token: set SAGA_API_TOKEN (changes then need"
            " Authorization: Bearer <token>), or listen on 127.0.0.1"
        )
    # Uvicorn's own access log would print query strings; the app logs one line per request instead.
    uvicorn.run(create_app(orch), host=host, port=port, access_log=False, log_level="warning", server_header=False)


COMMANDS = [worker, projections, demo, bench, serve]
