"""The ``saga`` command line: run workers and the demo, start and steer sagas, read their state."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from pydantic import ValidationError

from orchestrator.app import Orchestrator
from orchestrator.errors import OrchestratorError
from orchestrator.logging import configure_logging
from orchestrator.settings import Settings
from orchestrator.status import SagaStatus

DEFAULT_APP = "sagas:app"


class Group(click.Group):
    """Turns the engine's errors into one clear line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OrchestratorError, TimeoutError, ValidationError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)


def load_app(spec: str) -> Orchestrator:
    """The orchestrator named by ``module:attribute`` (an Orchestrator, or a function returning one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected module:attribute, got {spec!r}", param_hint="--app")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise click.BadParameter(f"cannot load {spec!r}: {error}", param_hint="--app") from error
    orch = target() if callable(target) and not isinstance(target, Orchestrator) else target
    if not isinstance(orch, Orchestrator):
        raise click.BadParameter(f"{spec!r} is not an Orchestrator (got {orch!r})", param_hint="--app")
    return orch


def parse_json(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from the command line."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint=what) from error
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=what)
    return value


def status_table(statuses: Sequence[SagaStatus]) -> str:
    """A plain-text table of sagas, one line each."""
    rows = [("SAGA ID", "SAGA", "STATE", "STEP", "ATTEMPTS", "UPDATED", "ERROR")]
    for s in statuses:
        rows.append(
            (
                s.saga_id,
                s.saga,
                s.state.value,
                s.current_step or "-",
                str(sum(step.attempts + step.compensation_attempts for step in s.steps)),
                s.updated_at.strftime("%H:%M:%S"),
                (s.error or "")[:90],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ).rstrip()


app_option = click.option(
    "--app",
    "app_spec",
    envvar="SAGA_APP",
    default=DEFAULT_APP,
    show_default=True,
    help="module:attribute of the Orchestrator, or of a function returning one (env SAGA_APP).",
)


@click.group(cls=Group)
@click.option("--log-level", default=None, help="Lowest level logged (default: SAGA_LOG_LEVEL or info).")
@click.option("--json-logs/--console-logs", default=None, help="Log format (default: JSON unless on a terminal).")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, json_logs: bool | None) -> None:
    """sagaworks: durable sagas on event sourcing."""
    settings = Settings.from_env()
    configure_logging(
        json=settings.log_json if json_logs is None else json_logs,
        level=log_level or settings.log_level,
    )


def app_of(ctx: click.Context, spec: str) -> Orchestrator:
    """The orchestrator of this invocation, opened, and closed when the command ends."""
    orch = load_app(spec)
    ctx.call_on_close(orch.close)
    return orch.open()


@cli.command()
@click.option("--concurrency", type=click.IntRange(1), default=None, help="Attempts run at once.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Sagas claimed per transaction.")
@click.option("--drain", is_flag=True, help="Run what is runnable now, then exit.")
@app_option
@click.pass_context
def worker(ctx: click.Context, app_spec: str, concurrency: int | None, batch_size: int | None, drain: bool) -> None:
    """Run a worker until SIGTERM/SIGINT; it then finishes the attempts in hand and exits."""
    app_of(ctx, app_spec).run_worker(wait=not drain, concurrency=concurrency, batch_size=batch_size)


@cli.command()
@click.argument("saga")
@click.option("--input", "input_json", required=True, help="The saga's input as a JSON object.")
@click.option("--id", "saga_id", default=None, help="Saga id (the idempotency key); default: a new one.")
@click.option(
    "--at",
    "start_at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"]),
    default=None,
    help="Start later, at this timezone-aware time (e.g. 2026-12-01T09:00:00+00:00).",
)
@app_option
@click.pass_context
def start(
    ctx: click.Context, app_spec: str, saga: str, input_json: str, saga_id: str | None, start_at: datetime | None
) -> None:
    """Start a saga and print its id."""
    click.echo(app_of(ctx, app_spec).start(saga, parse_json(input_json, "--input"), saga_id=saga_id, start_at=start_at))


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def status(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Print a saga's status as JSON."""
    click.echo(app_of(ctx, app_spec).status(saga_id).model_dump_json(indent=2))


@cli.command(name="list")
@click.option("--state", default=None, help="Only sagas in this state.")
@click.option("--saga", default=None, help="Only sagas of this name.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@app_option
@click.pass_context
def list_(ctx: click.Context, app_spec: str, state: str | None, saga: str | None, limit: int, as_json: bool) -> None:
    """List sagas, most recently updated first."""
    statuses = app_of(ctx, app_spec).list(state=state, saga=saga, limit=limit)
    if as_json:
        for s in statuses:
            click.echo(s.model_dump_json())
    else:
        click.echo(status_table(statuses))


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def history(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Print a saga's events in order, one JSON object per line."""
    for event in app_of(ctx, app_spec).history(saga_id):
        click.echo(event.model_dump_json())


@cli.command()
@click.argument("saga_id")
@click.argument("event")
@click.option("--data", default=None, help="The event's payload as a JSON object.")
@app_option
@click.pass_context
def send(ctx: click.Context, app_spec: str, saga_id: str, event: str, data: str | None) -> None:
    """Deliver an event (e.g. an approval) to a waiting saga."""
    app_of(ctx, app_spec).send(saga_id, event, parse_json(data, "--data"))
    click.echo(f"sent {event} to {saga_id}")


@cli.command()
@click.argument("saga_id")
@click.option("--reason", default=None)
@app_option
@click.pass_context
def cancel(ctx: click.Context, app_spec: str, saga_id: str, reason: str | None) -> None:
    """Cancel a saga: what it did is compensated."""
    app_of(ctx, app_spec).cancel(saga_id, reason)
    click.echo(f"cancelling {saga_id}")


@cli.command()
@click.argument("saga_id")
@app_option
@click.pass_context
def retry(ctx: click.Context, app_spec: str, saga_id: str) -> None:
    """Resume a failed saga's compensations."""
    app_of(ctx, app_spec).retry(saga_id)
    click.echo(f"retrying {saga_id}")


@cli.group()
def projections() -> None:
    """Read models built from the histories."""


@projections.command()
@app_option
@click.pass_context
def rebuild(ctx: click.Context, app_spec: str) -> None:
    """Rebuild the saga-status read model from the event histories."""
    from projections.status import StatusProjection

    progress = StatusProjection(app_of(ctx, app_spec)).rebuild()
    click.echo(f"rebuilt saga status: {progress.sagas} sagas from {progress.notifications} events")


@projections.command()
@click.option("--poll-interval", type=float, default=1.0, show_default=True)
@app_option
@click.pass_context
def run(ctx: click.Context, app_spec: str, poll_interval: float) -> None:
    """Keep the read models caught up with the histories until SIGTERM/SIGINT."""
    import signal
    import threading

    from projections.status import StatusProjection

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    StatusProjection(app_of(ctx, app_spec)).run_forever(stop, poll_interval)


@cli.command()
@click.option("--database", default=None, help="Database URL (default: SAGA_DATABASE_URL or sqlite:///sagaworks.db).")
@click.option("--count", type=click.IntRange(1, 1000), default=12, show_default=True, help="Sagas to start.")
@click.pass_context
def demo(ctx: click.Context, database: str | None, count: int) -> None:
    """Run a mix of the example sagas on the embedded database and print their final states."""
    from sagas.demo import run_demo  # the CLI is the composition root; the engine never imports sagas

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        configure_logging(json=ctx.parent.params.get("json_logs"), level="warning")  # progress, not logs
    run_demo(database, count)


@cli.command()
@click.option("--workload", type=click.Choice(["ok", "compensate", "wait", "status"]), default="ok", show_default=True)
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
@click.option("--start-batch", type=click.IntRange(1), default=200, show_default=True, help="Sagas per start_many.")
@click.option("--concurrency", type=click.IntRange(1), default=None, help="SAGA_CONCURRENCY of the workers.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="SAGA_BATCH_SIZE of the workers.")
@click.option("--json-only", is_flag=True, help="Print only the JSON line.")
@click.pass_context
def bench(ctx: click.Context, /, json_only: bool, **options: Any) -> None:
    """Measure a workload on a fresh database: throughput, latency, transactions; one JSON line last."""
    from benchmarks.bench import BenchOptions, json_line, run_bench  # the CLI is the composition root

    if ctx.parent is not None and ctx.parent.params.get("log_level") is None:
        configure_logging(json=ctx.parent.params.get("json_logs"), level="warning")  # progress, not logs
    say = (lambda _: None) if json_only else (lambda line: click.echo(line))
    try:
        result = run_bench(BenchOptions(**options), say)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(json_line(result))


def main() -> None:
    """Entry point of the ``saga`` script."""
    cli(prog_name="saga")
